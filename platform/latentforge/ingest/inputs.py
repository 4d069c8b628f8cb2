"""Input URL lists: find the files, validate them before any download, read row ranges.

Formats: parquet, csv, tsv, jsonl (each optionally .gz); one file, a directory (its files of
those formats, sorted by name) or a glob; local paths or fsspec URIs. Files are concatenated
in sorted order, so "row i" is stable across reruns. `plan_input` opens every file once
(parquet: footer only; text: one streaming pass to count rows), checks the columns and
fails with `InputError` on a missing column, an empty input or an unreadable file.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import fsspec
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
              ".ndjson": "jsonl", ".json": "jsonl"}
csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))


class InputError(ValueError):
    """The input cannot be used (missing column, empty, unreadable); raised before any download."""


@dataclass
class InputFile:
    uri: str
    format: str
    rows: int
    start: int  # global index of this file's first row
    row_groups: list[int] = field(default_factory=list)  # parquet: rows per row group


@dataclass
class InputPlan:
    """The files making up the input and the columns to read."""

    files: list[InputFile]
    url_col: str
    caption_col: str | None
    hash_col: str | None
    extra_cols: list[str]

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputPlan":
        return cls(files=[InputFile(**f) for f in data["files"]], url_col=data["url_col"],
                   caption_col=data["caption_col"], hash_col=data["hash_col"], extra_cols=list(data["extra_cols"]))


def file_format(uri: str, forced: str = "auto") -> str | None:
    if forced != "auto":
        return forced
    name = uri.rsplit("/", 1)[-1].lower()
    for suffix in (".gz", ".gzip", ".bz2", ".zst", ".xz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    dot = name.rfind(".")
    return EXTENSIONS.get(name[dot:]) if dot >= 0 else None


def list_input_files(uri: str, forced: str = "auto") -> list[str]:
    """The input's files, sorted; a directory contributes its files of known formats."""
    try:
        fs, path = url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        raise InputError(f"cannot open input {uri!r}: {exc}") from exc
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol

    def unstrip(p: str) -> str:
        return p if protocol in ("file", "local") else fs.unstrip_protocol(p)

    if any(c in path for c in "*?["):
        paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path, maxdepth=1)
                       if not p.rsplit("/", 1)[-1].startswith((".", "_")) and file_format(p, forced))
    elif fs.exists(path):
        paths = [path]
    else:
        raise InputError(f"input {uri!r} does not exist")
    if not paths:
        raise InputError(f"input {uri!r} matches no parquet/csv/tsv/jsonl files")
    return [unstrip(p) for p in paths]


def _open_text(uri: str) -> io.TextIOBase:
    return fsspec.open(uri, "rt", compression="infer", encoding="utf-8", newline="").open()


def _csv_reader(handle: Any, fmt: str) -> Any:
    return csv.reader(handle, delimiter="\t" if fmt == "tsv" else ",")


def _scan_text(uri: str, fmt: str) -> tuple[list[str], int]:
    """(columns, rows) of a csv/tsv/jsonl file in one streaming pass."""
    with _open_text(uri) as handle:
        if fmt in ("csv", "tsv"):
            reader = _csv_reader(handle, fmt)
            header = next(reader, None)
            if header is None:
                return [], 0
            return [h.strip() for h in header], sum(1 for row in reader if row)
        columns: list[str] = []
        rows = 0
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if rows == 0:
                try:
                    first = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{uri}: line {line_no} is not JSON ({exc})") from exc
                if not isinstance(first, dict):
                    raise InputError(f"{uri}: line {line_no} is not a JSON object")
                columns = list(first)
            rows += 1
        return columns, rows


def plan_input(uri: str, url_col: str, caption_col: str | None, hash_col: str | None = None,
               forced_format: str = "auto") -> InputPlan:
    """Validate the whole input (columns, emptiness, readability) and count its rows."""
    files: list[InputFile] = []
    extra: list[str] | None = None
    start = 0
    needed = [c for c in (url_col, caption_col, hash_col) if c]
    for file_uri in list_input_files(uri, forced_format):
        fmt = file_format(file_uri, forced_format)
        if fmt is None:
            raise InputError(f"{file_uri}: unknown format; use --input-format parquet|csv|tsv|jsonl")
        try:
            if fmt == "parquet":
                with fsspec.open(file_uri, "rb") as handle:
                    meta = pq.ParquetFile(handle).metadata
                    columns = list(meta.schema.to_arrow_schema().names)
                    row_groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                rows = meta.num_rows
            else:
                columns, rows = _scan_text(file_uri, fmt)
                row_groups = []
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable file
            raise InputError(f"cannot read {file_uri} as {fmt}: {type(exc).__name__}: {exc}") from exc
        if rows == 0:
            continue
        missing = [c for c in needed if c not in columns]
        if missing:
            raise InputError(f"{file_uri}: missing column(s) {missing}; it has {columns}. "
                             "Set --url-col/--caption-col (LAION: --url-col URL --caption-col TEXT)")
        cols_extra = [c for c in columns if c not in needed]
        extra = cols_extra if extra is None else extra + [c for c in cols_extra if c not in extra]
        files.append(InputFile(uri=file_uri, format=fmt, rows=rows, start=start, row_groups=row_groups))
        start += rows
    if not files:
        raise InputError(f"input {uri!r} has no rows")
    return InputPlan(files=files, url_col=url_col, caption_col=caption_col, hash_col=hash_col,
                     extra_cols=extra or [])


def _records(file: InputFile, lo: int, hi: int) -> Iterator[dict[str, Any]]:
    """Records lo..hi-1 (file-local indices) of one file."""
    if file.format == "parquet":
        with fsspec.open(file.uri, "rb") as handle:
            pf = pq.ParquetFile(handle)
            offset = 0
            for group, count in enumerate(file.row_groups):
                if offset + count <= lo:
                    offset += count
                    continue
                if offset >= hi:
                    break
                table = pf.read_row_group(group)
                a, b = max(lo - offset, 0), min(hi - offset, count)
                yield from table.slice(a, b - a).to_pylist()
                offset += count
        return
    with _open_text(file.uri) as handle:
        if file.format in ("csv", "tsv"):
            reader = _csv_reader(handle, file.format)
            header = [h.strip() for h in next(reader)]
            index = 0
            for row in reader:
                if not row:
                    continue
                if index >= hi:
                    break
                if index >= lo:
                    yield dict(zip(header, row + [""] * (len(header) - len(row))))
                index += 1
            return
        index = 0
        for line in handle:
            if not line.strip():
                continue
            if index >= hi:
                break
            if index >= lo:
                record = json.loads(line)
                yield record if isinstance(record, dict) else {}
            index += 1


def read_rows(plan: InputPlan, start: int, end: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(global row index, record) for rows start..end-1 across the input's files."""
    for file in plan.files:
        lo, hi = max(start, file.start), min(end, file.start + file.rows)
        if lo >= hi:
            continue
        for i, record in enumerate(_records(file, lo - file.start, hi - file.start)):
            yield lo + i, record


def split_record(plan: InputPlan, record: dict[str, Any]) -> tuple[str, str, str | None, dict[str, Any]]:
    """(url, caption, expected hash, extra columns) of one input record."""
    url = record.get(plan.url_col)
    caption = record.get(plan.caption_col) if plan.caption_col else None
    expected = record.get(plan.hash_col) if plan.hash_col else None
    reserved = {plan.url_col, plan.caption_col, plan.hash_col}
    extra = {k: _jsonable(v) for k, v in record.items() if k not in reserved}
    return ("" if url is None else str(url)), ("" if caption is None else str(caption)), \
        (str(expected).strip().lower() if expected not in (None, "") else None), extra


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, TypeError):
            pass
    return str(value)
