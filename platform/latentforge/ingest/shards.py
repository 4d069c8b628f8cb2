"""One shard's work: download its rows concurrently, write tar + ledger + stats atomically.

A shard descriptor is a small dict the driver builds (and Ray ships to one task):
- `{"shard": 3, "kind": "range", "start": 3000, "end": 4000}`: input rows 3000..3999;
- `{"shard": 12, "kind": "retry", "rows": [{row, retry_of, previous, url, caption, hash, extra}]}`:
  rows of finished shards re-fetched by `--retry-reasons` (their data comes from the ledgers).

Row `j` of a shard always gets key `sample_key(shard, j)`, whatever finishes first; samples go
into the tar in key order. Downloads run on `threads_per_shard` threads (bounded by the
per-host cap); at most `2 * threads_per_shard` finished rows wait for their turn to be
written, so a shard's memory is bounded by that window, not by the shard size.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from latentforge import formats, storage
from latentforge.ingest.config import IngestConfig
from latentforge.ingest.download import Fetcher, FetchSettings
from latentforge.ingest.images import ImageProcessor, standard_streams_kept
from latentforge.ingest.inputs import InputPlan, read_rows, split_record
from latentforge.light_imports import tar_writer_class
from latentforge.ingest.safety import AddressPolicy
from latentforge.tar_writer import SampleTarWriter

LEDGER_SCHEMA = pa.schema([
    ("key", pa.string()), ("row", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("http_status", pa.int32()), ("retry_of", pa.string()),
    ("sha256", pa.string()), ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.int64()), ("attempts", pa.int32()),
    ("seconds", pa.float32()), ("expected_hash", pa.string()), ("extra", pa.string()),
])


def tar_name(shard: int) -> str:
    return f"{formats.shard_name(shard)}.tar"


def ledger_name(shard: int) -> str:
    return f"{formats.shard_name(shard)}.parquet"


def stats_name(shard: int) -> str:
    return f"{formats.shard_name(shard)}_stats.json"


@dataclass
class RowTask:
    index: int           # position in the shard (-> key)
    row: int             # global input row
    url: str
    caption: str
    expected_hash: str | None
    extra: dict[str, Any]
    retry_of: str | None = None
    previous: str | None = None


# One fetcher/processor per worker process and config, so the per-host cap spans its tasks.
_WORKERS: dict[str, tuple[Fetcher, ImageProcessor]] = {}
_WORKERS_LOCK = threading.Lock()


def worker_parts(config: IngestConfig) -> tuple[Fetcher, ImageProcessor]:
    key = json.dumps(config.__dict__, sort_keys=True, default=str)
    with _WORKERS_LOCK:
        parts = _WORKERS.get(key)
        if parts is None:
            policy = AddressPolicy(allow_private=config.allow_private_network, allow_networks=config.allow_networks)
            parts = _WORKERS[key] = (Fetcher(FetchSettings.from_config(config), policy), ImageProcessor(config))
        return parts


def warm_worker(config: IngestConfig) -> None:
    """Pay a shard task's one-off costs now: webdataset's tar writer, the resizer's
    cv2/albumentations and this process's fetcher. A worker that ran this starts shards at once."""
    tar_writer_class()
    worker_parts(config)


def shard_rows(descriptor: dict[str, Any], plan: InputPlan) -> Iterator[RowTask]:
    if descriptor["kind"] == "range":
        for j, (row, record) in enumerate(read_rows(plan, descriptor["start"], descriptor["end"])):
            url, caption, expected, extra = split_record(plan, record)
            yield RowTask(j, row, url, caption, expected, extra)
        return
    for j, item in enumerate(descriptor["rows"]):
        yield RowTask(j, item["row"], item["url"] or "", item["caption"] or "", item.get("hash"),
                      json.loads(item["extra"]) if item.get("extra") else {}, item["retry_of"], item["previous"])


def _digest(data: bytes, kind: str) -> str:
    return hashlib.new(kind, data).hexdigest()


def handle_row(task: RowTask, key: str, config: IngestConfig, fetcher: Fetcher,
               processor: ImageProcessor) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(ledger row, tar sample or None) for one input row; never raises."""
    try:
        return _handle_row(task, key, config, fetcher, processor)
    except Exception as exc:  # noqa: BLE001 - one bad row must not lose the shard
        return _entry(task, key) | {"status": "internal_error", "error": f"{type(exc).__name__}: {exc}"[:500]}, None


def _entry(task: RowTask, key: str) -> dict[str, Any]:
    return {
        "key": key, "row": task.row, "url": task.url, "caption": task.caption, "status": "ok", "error": "",
        "http_status": None, "retry_of": task.retry_of, "sha256": None, "original_width": None,
        "original_height": None, "width": None, "height": None, "bytes": 0, "attempts": 0, "seconds": 0.0,
        "expected_hash": task.expected_hash,
        "extra": formats.encode_json(task.extra).decode() if task.extra else None,
    }


def _handle_row(task: RowTask, key: str, config: IngestConfig, fetcher: Fetcher,
                processor: ImageProcessor) -> tuple[dict[str, Any], dict[str, Any] | None]:
    entry = _entry(task, key)
    result = fetcher.fetch(task.url)
    entry.update(http_status=result.http_status, attempts=result.attempts, seconds=result.seconds)
    if result.status != "ok" or result.data is None:
        entry.update(status=result.status, error=result.error)
        return entry, None
    data = result.data
    entry["bytes"] = len(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    if task.expected_hash:
        got = entry["sha256"] if config.hash_type == "sha256" else _digest(data, config.hash_type)
        if got != task.expected_hash:
            entry.update(status="hash_mismatch", error=f"{config.hash_type} {got} != expected {task.expected_hash}")
            return entry, None
    image = processor.process(data)
    entry.update(original_width=image.original_width, original_height=image.original_height)
    if image.status != "ok" or image.data is None:
        entry.update(status=image.status, error=image.error)
        return entry, None
    entry.update(width=image.width, height=image.height)
    meta = {**task.extra}
    meta.update({"key": key, "url": task.url, "caption": task.caption, "width": image.width,
                 "height": image.height, "original_width": image.original_width,
                 "original_height": image.original_height, "sha256": entry["sha256"]})
    sample = {"__key__": key, processor.extension: image.data, "txt": task.caption.encode("utf-8"),
              "json": formats.encode_json(meta)}
    return entry, sample


def process_shard(descriptor: dict[str, Any], config: IngestConfig, plan: InputPlan) -> dict[str, Any]:
    """Write one shard's three files (each atomically) and return its manifest record."""
    started = time.monotonic()
    shard = int(descriptor["shard"])
    fetcher, processor = worker_parts(config)
    out = config.output
    threads = max(1, config.threads_per_shard)
    ledger: list[dict[str, Any]] = []
    counts: collections.Counter[str] = collections.Counter()
    replaces: collections.Counter[str] = collections.Counter()
    tar_uri = storage.join(out, tar_name(shard))
    with SampleTarWriter(tar_uri) as writer, standard_streams_kept(), \
            ThreadPoolExecutor(threads, thread_name_prefix="lf-dl") as pool:
        window: collections.deque[Future] = collections.deque()

        def drain_one() -> None:
            entry, sample = window.popleft().result()
            ledger.append(entry)
            counts[entry["status"]] += 1
            if sample is not None:
                writer.write(sample)

        for task in shard_rows(descriptor, plan):
            key = formats.sample_key(shard, task.index)
            if task.previous:
                replaces[task.previous] += 1
            window.append(pool.submit(handle_row, task, key, config, fetcher, processor))
            while len(window) >= 2 * threads:
                drain_one()
        while window:
            drain_one()
        tar = writer.close()

    table = pa.Table.from_pylist(ledger, schema=LEDGER_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    ledger_bytes = buffer.getvalue()
    storage.atomic_write_bytes(storage.join(out, ledger_name(shard)), ledger_bytes)
    seconds = time.monotonic() - started
    stats = {
        "shard": formats.shard_name(shard), "kind": descriptor["kind"], "rows": len(ledger),
        "counts": dict(sorted(counts.items())), "replaces": dict(sorted(replaces.items())),
        "downloaded_bytes": int(sum(e["bytes"] or 0 for e in ledger)), "tar_bytes": tar.size,
        "seconds": round(seconds, 3),
    }
    if descriptor["kind"] == "range":
        stats["row_range"] = [descriptor["start"], descriptor["end"]]
    stats_bytes = (json.dumps(stats, indent=2) + "\n").encode()
    storage.atomic_write_bytes(storage.join(out, stats_name(shard)), stats_bytes)
    return {
        "name": formats.shard_name(shard), "samples": counts.get("ok", 0), "sha256": tar.sha256, "size": tar.size,
        "files": {ledger_name(shard): storage.sha256_bytes(ledger_bytes),
                  stats_name(shard): storage.sha256_bytes(stats_bytes)},
        "stats": {"kind": descriptor["kind"], "rows": len(ledger), "counts": stats["counts"],
                  "replaces": stats["replaces"], "downloaded_bytes": stats["downloaded_bytes"],
                  "seconds": stats["seconds"]},
    }


def read_ledger(dir_uri: str, shard_name: str) -> pa.Table:
    fs, path = storage.filesystem(storage.join(dir_uri, f"{shard_name}.parquet"))
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)
