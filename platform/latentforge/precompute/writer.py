"""Latent shard writer: one tar per input shard (a `SampleTarWriter`: written to a temp name,
hashed as it is written, renamed when complete); `ShardSink` routes the encoder's rows to the
writers and settles each shard (published or not).

Tars are byte-reproducible (fixed member headers, samples in arrival order), so a rerun of a
killed job produces the same file hashes as an uninterrupted run.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from latentforge import formats, storage
from latentforge.conditioning.values import MEMBER as CONDITIONS_MEMBER, ShardConditions
from latentforge.manifest import ShardRecord
from latentforge.precompute.config import PrecomputeConfig
from latentforge.precompute.preprocess import STATUS_OK
from latentforge.tar_writer import SampleTarWriter

log = logging.getLogger("latentforge.precompute")

TRAILER = "_end"
"""Status of the row that ends a shard: its `count` is the rows read, its meta the read error ("" = none)."""
PAD = "_pad"
"""Status of the rows that pad a shard's last block to a whole encoder batch."""


def sample_members(key: str, latent: np.ndarray, text: np.ndarray, pooled: np.ndarray,
                   caption: str, meta: dict[str, Any], pixels: np.ndarray | None = None) -> dict[str, Any]:
    """One latent sample for `SampleTarWriter.write`: its five members (``text`` already cut to the
    real tokens), its preprocessed image (uint8 HWC) with --store-pixels, its conditions if any."""
    members: dict[str, Any] = {
        "__key__": key,
        "latent.npy": formats.encode_npy(latent),
        "text.npy": formats.encode_npy(text),
        "pooled.npy": formats.encode_npy(pooled),
        "txt": caption.encode("utf-8"),
        "json": formats.encode_json(meta),
    }
    if pixels is not None:
        members[formats.PIXELS_MEMBER] = formats.encode_npy(np.asarray(pixels, dtype=np.uint8))
    if "conditions" in meta:
        members[CONDITIONS_MEMBER] = formats.encode_json(meta["conditions"])
    return members


@dataclass
class ShardWriter:
    """Accumulates one output shard; ``finish`` publishes it atomically and returns its record."""

    out_dir: str
    name: str
    dtype: str
    input_sha256: str = ""
    input_samples: int = 0
    """Samples the ingest manifest lists for the input shard."""
    expected: int | None = None
    """Rows the reader found in the input shard (known once its trailer row arrives)."""
    error: str = ""
    """Why the input shard could not be read completely ("" = it was); set from the trailer row."""
    seen: int = 0
    ok: int = 0
    skipped: Counter = field(default_factory=Counter)
    conditions: ShardConditions = field(default_factory=ShardConditions)
    _sum: float = 0.0
    _sumsq: float = 0.0
    _count: int = 0
    _tar: SampleTarWriter | None = None

    @property
    def uri(self) -> str:
        return storage.join(self.out_dir, f"{self.name}.tar")

    def _open(self) -> SampleTarWriter:
        if self._tar is None:
            self._tar = SampleTarWriter(self.uri)
        return self._tar

    def add(self, row: dict[str, Any]) -> None:
        """One row from the encoder: a sample (status ok), a skipped sample, or nothing else."""
        tar = self._open()
        self.seen += 1
        status = str(row["status"])
        if status != STATUS_OK:
            self.skipped[status] += 1
            return
        key = str(row["key"])
        length = int(row["text_length"])
        meta = formats.decode_json(str(row["meta"]).encode("utf-8"))
        meta["text_length"] = length
        latent = np.asarray(row["latent"])
        tar.write(sample_members(key, latent, np.asarray(row["text"])[:length], np.asarray(row["pooled"]),
                                 str(row["caption"]), meta, row.get("image")))
        if "conditions" in meta:
            self.conditions.add(meta["conditions"])
        values = formats.storage_to_tensor(latent, self.dtype).float().numpy()
        values = values[0] if values.ndim == 4 else values  # mean_std: statistics of the mean
        self._sum += float(values.sum(dtype=np.float64))
        self._sumsq += float(np.square(values, dtype=np.float64).sum())
        self._count += values.size
        self.ok += 1

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.seen >= self.expected

    def finish(self) -> ShardRecord:
        """Close, fsync, rename onto NNNNN.tar; the record for the manifest (its hash taken while writing)."""
        tar = self._open().close()
        mean = self._sum / self._count if self._count else 0.0
        var = max(self._sumsq / self._count - mean * mean, 0.0) if self._count else 0.0
        stats = {"input_sha256": self.input_sha256, "rows": self.seen, "ok": self.ok,
                 "skipped": dict(sorted(self.skipped.items())), "latent_mean": mean, "latent_std": var ** 0.5}
        if self.conditions.stats():
            stats["conditions"] = self.conditions.stats()
        if self.error:
            stats["partial"] = {"reason": self.error,
                                "lost_samples": max(self.input_samples - self.seen, 0)}
        return ShardRecord(name=self.name, samples=self.ok, sha256=tar.sha256, stats=stats, size=tar.size)

    def abort(self) -> None:
        """Drop the temp file of an unfinished tar."""
        if self._tar is not None:
            try:
                self._tar.abort()
            except Exception:  # noqa: BLE001 - best effort; stale temps are ignored and removed later
                pass

    def discard(self) -> None:
        """Abort, and remove a final tar an earlier run left: an unpublished shard has no file."""
        self.abort()
        fs, path = storage.filesystem(self.uri)
        if fs.exists(path):
            fs.rm(path)


class ShardSink:
    """Routes the encoder's rows to one `ShardWriter` per shard and settles each shard once all of
    its rows are in: published (its record added, `publish()` called) or, when its input could not
    be read completely and partial shards are not allowed, discarded and listed in `failed`."""

    def __init__(self, config: PrecomputeConfig, inputs: dict[str, ShardRecord], records: dict[str, ShardRecord],
                 publish: Callable[[], Any], failed: dict[str, str]) -> None:
        self.config, self.inputs, self.records, self.publish, self.failed = config, inputs, records, publish, failed
        self.writers: dict[str, ShardWriter] = {}
        self.keys: dict[str, set[str]] = {}
        self.counts: Counter = Counter()

    def wants(self, shard: str) -> bool:
        """Whether this sink writes `shard` (a --resolutions run may still need it for another size only)."""
        return shard in self.inputs

    def add(self, row: dict[str, Any]) -> int:
        """Take one row (sample, trailer or padding); returns how many samples it added (0 or 1)."""
        shard, status, key = str(row["shard"]), str(row["status"]), str(row["key"])
        writer = self.writers.get(shard) or self._open(shard)
        added = 0
        if status == TRAILER:
            writer.expected = int(row["count"])
            writer.error = formats.decode_json(str(row["meta"]).encode("utf-8"))["error"]
        elif status != PAD and key not in self.keys[shard]:  # a retried block may arrive twice
            self.keys[shard].add(key)
            writer.add(row)
            self.counts["rows"] += 1
            self.counts[status] += 1
            added = 1
        if writer.complete:
            self._settle(shard, writer)
        return added

    def _open(self, shard: str) -> ShardWriter:
        source = self.inputs[shard]
        self.keys[shard] = set()
        writer = self.writers[shard] = ShardWriter(self.config.output, shard, self.config.dtype,
                                                   input_sha256=source.sha256, input_samples=source.samples)
        return writer

    def _settle(self, shard: str, writer: ShardWriter) -> None:
        del self.writers[shard], self.keys[shard]
        if writer.error and not self.config.allow_partial_shards:
            writer.discard()
            self.failed[shard] = writer.error
            log.error("shard %s: not published: %s", shard, writer.error)
            return
        record = self.records[shard] = writer.finish()
        self.publish()
        log.info("shard %s: %d stored, skipped %s%s", shard, record.samples, record.stats["skipped"],
                 f", PARTIAL: {writer.error}" if writer.error else "")

    def abort(self) -> None:
        """Drop the temp files of shards still open (an interrupted or failed run)."""
        for writer in self.writers.values():
            writer.abort()
