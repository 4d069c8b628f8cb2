"""Input URL lists: find the files, validate them before any download, read row ranges.

Formats: parquet, csv, tsv, jsonl (each optionally .gz); one file, a directory (its files of
those formats, sorted by name) or a glob; local paths or fsspec URIs. Files are concatenated
in sorted order, so "row i" is stable across reruns. `plan_input` opens every file once
(parquet: footer only; text: one streaming pass), checks the columns and fails with
`InputError` on a missing column, an empty input or an unreadable file.

A text file cannot be entered in the middle (a gzip stream not at all), so reading shard k
of it would mean parsing every row before it, for every shard: O(rows^2 / shard size). The
planning pass therefore also copies each text file into an Arrow IPC file under `index_dir`
(`{index_dir}/NNNNN.arrow`, record batches of `index_rows` rows, written atomically), and
shards read their rows from that copy's batches, which the IPC footer locates: every input
byte is parsed once per run. The copy holds what today's row reading would make of each row
(csv/tsv: the header-named string fields, short rows padded with ""; jsonl: the raw line,
decoded when read), so row numbers and records are the same as parsing the text directly.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from latentforge import storage
from latentforge.ingest.config import IngestConfig

EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
              ".ndjson": "jsonl", ".json": "jsonl"}
csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
INDEX_DIR_NAME = "_input_index"   # inside the output dir; removed when a run ends
JSON_LINE = "line"                # the index column of a jsonl file: the raw line


class InputError(ValueError):
    """The input cannot be used (missing column, empty, unreadable); raised before any download."""


@dataclass
class InputFile:
    uri: str
    format: str
    rows: int
    start: int  # global index of this file's first row
    row_groups: list[int] = field(default_factory=list)  # rows per parquet row group / index batch
    index: str | None = None  # text formats: the Arrow IPC copy the shards read
    columns: list[str] = field(default_factory=list)  # its columns beyond url/caption/hash (kept as metadata)


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
        fs, path = storage.filesystem(uri)
    except storage.StorageBackendMissing:
        raise
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


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _csv_batches(handle: Any, fmt: str, batch_rows: int) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    """(columns, batches of string columns) holding what `dict(zip(header, padded row))` holds."""
    reader = csv.reader(handle, delimiter="\t" if fmt == "tsv" else ",")
    header = next(reader, None)
    if header is None:
        return [], iter(())
    names = [h.strip() for h in header]
    width = len(names)
    last = {name: i for i, name in enumerate(names)}  # a repeated name keeps its last field, as in a dict
    columns, picks = list(last), list(last.values())

    def batches() -> Iterator[pa.RecordBatch]:
        for chunk in _chunks((row for row in reader if row), batch_rows):
            padded = [row if len(row) >= width else row + [""] * (width - len(row)) for row in chunk]
            arrays = [pa.array([row[i] for row in padded], pa.string()) for i in picks]
            yield pa.RecordBatch.from_arrays(arrays, names=columns)
    return columns, batches()


def _jsonl_batches(handle: Any, uri: str, batch_rows: int) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    """(keys of the first object, batches of the non-blank raw lines); the first must be an object."""
    lines = (line for line in handle if line.strip())
    first = next(lines, None)
    if first is None:
        return [], iter(())
    try:
        record = json.loads(first)
    except json.JSONDecodeError as exc:
        raise InputError(f"{uri}: the first row is not JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise InputError(f"{uri}: the first row is not a JSON object")
    batches = (pa.RecordBatch.from_arrays([pa.array(chunk, pa.string())], names=[JSON_LINE])
               for chunk in _chunks(itertools.chain([first], lines), batch_rows))
    return list(record), batches


def _require_columns(file_uri: str, columns: list[str], needed: list[str]) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InputError(f"{file_uri}: missing column(s) {missing}; it has {columns}. "
                         "Set --url-col/--caption-col (LAION: --url-col URL --caption-col TEXT)")


def _index_text(uri: str, fmt: str, index_uri: str, batch_rows: int,
                needed: list[str]) -> tuple[list[str], list[int]]:
    """(columns, rows per batch) of a csv/tsv/jsonl file, parsed once into an Arrow IPC copy."""
    with _open_text(uri) as handle:
        columns, batches = (_jsonl_batches(handle, uri, batch_rows) if fmt == "jsonl"
                            else _csv_batches(handle, fmt, batch_rows))
        first = next(batches, None)
        if first is None:
            return columns, []
        _require_columns(uri, columns, needed)  # before anything is written
        sizes = []
        with storage.atomic_open(index_uri) as out, pa.ipc.new_file(out, first.schema) as writer:
            for batch in itertools.chain([first], batches):
                writer.write_batch(batch)
                sizes.append(batch.num_rows)
    return columns, sizes


def _layout(file_uri: str, fmt: str, index_uri: str | None, index_rows: int,
            needed: list[str]) -> tuple[list[str], list[int]]:
    """(columns, rows per row group / index batch) of one file that has the needed columns (or no
    rows); text files get their index here."""
    if index_uri is not None:
        return _index_text(file_uri, fmt, index_uri, index_rows, needed)
    with fsspec.open(file_uri, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
    columns = list(meta.schema.to_arrow_schema().names)
    if meta.num_rows:
        _require_columns(file_uri, columns, needed)
    return columns, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def plan_input(uri: str, url_col: str, caption_col: str | None, hash_col: str | None = None,
               forced_format: str = "auto", index_dir: str | None = None, index_rows: int = 1000) -> InputPlan:
    """Validate the whole input (columns, emptiness, readability) and count its rows.

    Text files are copied into `index_dir` (batches of `index_rows` rows) on the way; a refused
    input leaves no copy behind."""
    needed = [c for c in (url_col, caption_col, hash_col) if c]
    try:
        files, extra = _plan_files(uri, forced_format, needed, index_dir, index_rows)
    except BaseException:
        if index_dir is not None:
            _remove_tree(index_dir)
        raise
    if not files:
        raise InputError(f"input {uri!r} has no rows")
    return InputPlan(files=files, url_col=url_col, caption_col=caption_col, hash_col=hash_col, extra_cols=extra)


def _plan_files(uri: str, forced_format: str, needed: list[str], index_dir: str | None,
                index_rows: int) -> tuple[list[InputFile], list[str]]:
    """(the files with rows, their columns beyond `needed`), text files indexed on the way."""
    files: list[InputFile] = []
    extra: list[str] = []
    for n, file_uri in enumerate(list_input_files(uri, forced_format)):
        fmt = file_format(file_uri, forced_format)
        if fmt is None:
            raise InputError(f"{file_uri}: unknown format; use --input-format parquet|csv|tsv|jsonl")
        index = _index_uri(index_dir, n, file_uri, fmt)
        try:
            columns, groups = _layout(file_uri, fmt, index, index_rows, needed)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure means an unreadable file
            raise InputError(f"cannot read {file_uri} as {fmt}: {type(exc).__name__}: {exc}") from exc
        if not sum(groups):
            continue
        extra += [c for c in columns if c not in needed and c not in extra]
        start = files[-1].start + files[-1].rows if files else 0
        files.append(InputFile(uri=file_uri, format=fmt, rows=sum(groups), start=start, row_groups=groups,
                               index=index, columns=[c for c in columns if c not in needed]))
    return files, extra


def _index_uri(index_dir: str | None, position: int, file_uri: str, fmt: str) -> str | None:
    if fmt == "parquet":
        return None
    if index_dir is None:
        raise ValueError(f"{file_uri}: a {fmt} input needs an index_dir to be read by row ranges")
    return storage.join(index_dir, f"{position:05d}.arrow")


def index_dir(output: str) -> str:
    """Where a run keeps the Arrow copies of its text inputs."""
    return storage.join(output, INDEX_DIR_NAME)


def input_plan(config: IngestConfig) -> InputPlan:
    """The plan of `config.input`; text files are indexed in batches of one shard's rows."""
    return plan_input(config.input, config.url_col, config.caption_col, config.hash_col, config.input_format,
                      index_dir=index_dir(config.output), index_rows=config.samples_per_shard)


def discard_index(output: str) -> None:
    """Remove the run's text-input copies (every run makes its own from the input)."""
    _remove_tree(index_dir(output))


def _remove_tree(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _group_reader(file: InputFile, handle: Any) -> Callable[[int], Any]:
    if file.index is None:
        return pq.ParquetFile(handle).read_row_group
    return pa.ipc.open_file(handle).get_batch


def _decoded(fmt: str, rows: Any) -> list[dict[str, Any]]:
    """Records of a slice of a row group / index batch."""
    if fmt != "jsonl":
        return rows.to_pylist()
    records = [json.loads(line) for line in rows.column(0).to_pylist()]
    return [record if isinstance(record, dict) else {} for record in records]


def _records(file: InputFile, lo: int, hi: int) -> Iterator[dict[str, Any]]:
    """Records lo..hi-1 (file-local indices) of one file, from the row groups holding them."""
    with fsspec.open(file.index or file.uri, "rb") as handle:
        read_group = _group_reader(file, handle)
        offset = 0
        for group, count in enumerate(file.row_groups):
            a, b = max(lo - offset, 0), min(hi - offset, count)
            offset += count
            if a < b:
                yield from _decoded(file.format, read_group(group).slice(a, b - a))
            if offset >= hi:
                break


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
