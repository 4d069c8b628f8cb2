"""Small URL lists for tests: rows pointing at a loopback server, written in every input format;
a local filesystem that counts the bytes read through it."""

from __future__ import annotations

import collections
import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

FORMATS = ("parquet", "csv", "tsv", "jsonl")


def rows_for(urls: Sequence[str], captions: Sequence[str] | None = None, url_col: str = "url",
             caption_col: str = "caption", **extra_cols: Sequence[Any]) -> list[dict[str, Any]]:
    """[{url_col: url, caption_col: caption, extra...}] with default captions 'caption i'."""
    rows = []
    for i, url in enumerate(urls):
        row = {url_col: url, caption_col: captions[i] if captions is not None else f"caption {i}"}
        for name, values in extra_cols.items():
            row[name] = values[i]
        rows.append(row)
    return rows


def pool_rows(server: Any, count: int, offset: int = 0, **kwargs: Any) -> list[dict[str, Any]]:
    """`count` rows whose URLs are the server's /pool/<i>.jpg images (call server.set_pool first)."""
    return rows_for([server.pool_url(offset + i) for i in range(count)], **kwargs)


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]], fmt: str | None = None,
               gz: bool | None = None, row_group_size: int | None = None) -> Path:
    """Write rows as parquet/csv/tsv/jsonl (fmt from the suffix; `.gz` gzips text formats)."""
    path = Path(path)
    rows = list(rows)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    fmt = fmt or name.rsplit(".", 1)[-1]
    gz = path.name.endswith(".gz") if gz is None else gz
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
        return path
    buffer = io.StringIO()
    if fmt in ("csv", "tsv"):
        columns = list(rows[0]) if rows else ["url", "caption"]
        writer = csv.DictWriter(buffer, fieldnames=columns, delimiter="\t" if fmt == "tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
    elif fmt == "jsonl":
        for row in rows:
            buffer.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"unknown format {fmt}")
    data = buffer.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def laion_rows(laion_parquet: str | Path, server: Any, count: int) -> list[dict[str, Any]]:
    """Real LAION rows (URL, TEXT and the other columns) with URLs remapped to the server's pool."""
    table = pq.read_table(laion_parquet).slice(0, count)
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        row["ORIGINAL_URL"] = row.get("URL")
        row["URL"] = server.pool_url(i)
    return rows


class CountingFileSystem(LocalFileSystem):
    """Local files under `counting://`, counting the bytes read through it per path (all instances)."""

    protocol = ("counting",)
    bytes_read: collections.Counter = collections.Counter()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        handle = super()._open(path, mode, **kwargs)
        return io.BufferedReader(_CountedReads(handle, self._strip_protocol(path))) if "r" in mode else handle


class _CountedReads(io.RawIOBase):
    def __init__(self, handle: Any, path: str) -> None:
        self._handle, self._path = handle, path

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._handle.read(len(buffer))
        buffer[: len(data)] = data
        CountingFileSystem.bytes_read[self._path] += len(data)
        return len(data)

    def close(self) -> None:
        self._handle.close()
        super().close()


def counting_uri(path: str | Path) -> str:
    """`path` as a `counting://` URI (registering the protocol); reads show in `CountingFileSystem`."""
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    return f"counting://{Path(path).resolve()}"
