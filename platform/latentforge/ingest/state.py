"""What an ingest output directory holds, and what is left to do.

Only shards listed in `manifest.json` are finished; a listed shard whose tar (or ledger/stats)
is missing or does not match the recorded sha256 is dropped and redone. Anything else in the
directory (temp files of a killed writer, a tar renamed just before a kill -9 but never
listed) is ignored and overwritten, so the final key set is exact whatever moment a run died.

Totals (`manifest.counts`) count every input row once, by its *final* status:
- `rows`: input rows covered by finished base shards;
- one entry per status (`ok`, `timeout`, ...) over those rows;
- `retried`: rows re-fetched by `--retry-reasons` runs (their newest attempt's status is the one
  counted; the status it replaced is subtracted, recorded per retry shard as `stats.replaces`);
- `samples`: images in the finished tars (== `ok`: a row is `ok` in at most one shard, because
  only failed rows are ever retried).
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from latentforge import formats, manifest as mf, storage
from latentforge.config import config_to_dict
from latentforge.ingest.config import SAME_OUTPUT_KEYS, STATUSES, IngestConfig
from latentforge.ingest.inputs import InputPlan
from latentforge.ingest.shards import ledger_name, read_ledger, stats_name, tar_name

log = logging.getLogger(__name__)


@dataclass
class IngestState:
    config: IngestConfig
    plan: InputPlan
    manifest: mf.Manifest
    dropped: list[str] = field(default_factory=list)  # listed shards whose files did not verify

    @property
    def base_shards(self) -> int:
        return math.ceil(self.plan.total_rows / self.config.samples_per_shard)

    def finished(self) -> set[int]:
        return {int(s.name) for s in self.manifest.shards}

    def pending_base(self) -> list[dict[str, Any]]:
        done, sps, total = self.finished(), self.config.samples_per_shard, self.plan.total_rows
        return [{"shard": i, "kind": "range", "start": i * sps, "end": min((i + 1) * sps, total)}
                for i in range(self.base_shards) if i not in done]

    def retry_descriptors(self, reasons: list[str]) -> list[dict[str, Any]]:
        """New shards for the rows of finished shards whose final status is in `reasons`."""
        wanted = set(reasons)
        current: dict[int, dict[str, Any]] = {}
        columns = ["key", "row", "url", "caption", "status", "retry_of", "expected_hash", "extra"]
        for record in self.manifest.shards:  # sorted by name: retry shards come after base shards
            table = read_ledger(self.config.output, record.name).select(columns)
            is_retry = record.stats.get("kind") == "retry"
            for item in table.to_pylist():
                row = item["row"]
                if is_retry:
                    if item["status"] in wanted:
                        current[row] = {**current.get(row, {}), **item, "retry_of": item["retry_of"]}
                    else:
                        current.pop(row, None)
                elif item["status"] in wanted:
                    current[row] = {**item, "retry_of": item["key"]}
        rows = [current[r] for r in sorted(current)]
        start = max([self.base_shards] + [int(s.name) + 1 for s in self.manifest.shards])
        sps = self.config.samples_per_shard
        out = []
        for n, lo in enumerate(range(0, len(rows), sps)):
            chunk = [{"row": r["row"], "retry_of": r["retry_of"], "previous": r["status"], "url": r["url"],
                      "caption": r["caption"], "hash": r["expected_hash"], "extra": r["extra"]}
                     for r in rows[lo:lo + sps]]
            out.append({"shard": start + n, "kind": "retry", "rows": chunk})
        return out

    def record(self, result: dict[str, Any]) -> str:
        """Add a finished shard and rewrite the manifest atomically; returns the manifest sha256."""
        record = mf.ShardRecord(**result)
        self.manifest.shards = sorted([s for s in self.manifest.shards if s.name != record.name] + [record],
                                      key=lambda s: s.name)
        return self.save()

    def save(self) -> str:
        self.manifest.counts = totals(self.manifest.shards)
        extra = self.manifest.extra
        extra["complete"] = all(i in self.finished() for i in range(self.base_shards))
        extra["retry_shards"] = [s.name for s in self.manifest.shards if s.stats.get("kind") == "retry"]
        return mf.write_manifest(self.config.output, self.manifest)


def totals(shards: list[mf.ShardRecord]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    rows = retried = 0
    for shard in shards:
        kind = shard.stats.get("kind", "range")
        for status, n in shard.stats.get("counts", {}).items():
            counts[status] += n
        for status, n in shard.stats.get("replaces", {}).items():
            counts[status] -= n
        if kind == "retry":
            retried += shard.stats.get("rows", 0)
        else:
            rows += shard.stats.get("rows", 0)
    out = {"rows": rows, "samples": sum(s.samples for s in shards), "shards": len(shards), "retried": retried}
    for status in STATUSES:
        if counts.get(status):
            out[status] = counts[status]
    for status, n in sorted(counts.items()):  # statuses from a newer version, kept rather than lost
        if status not in out and n:
            out[status] = n
    return out


def shard_files_ok(dir_uri: str, record: mf.ShardRecord, verify_hashes: bool) -> bool:
    """The shard's tar is the one recorded (by size, a stat; by sha256 with `verify_hashes` or for a
    record without a size) and its ledger and stats exist (and match their sha256 with `verify_hashes`)."""
    shard = int(record.name)
    if not storage.matches_record(storage.join(dir_uri, tar_name(shard)), record.sha256, record.size, verify_hashes):
        return False
    files = {ledger_name(shard): "", stats_name(shard): "", **record.files}
    for name, sha in files.items():
        uri = storage.join(dir_uri, name)
        if not storage.exists(uri) or (verify_hashes and sha and storage.sha256_file(uri) != sha):
            return False
    return True


def open_state(config: IngestConfig, plan: InputPlan) -> IngestState:
    """Read (or start) the output's manifest; refuse incompatible settings; verify finished shards."""
    out = config.output
    storage.makedirs(out)
    removed = storage.remove_stale_temps(out)
    if removed:
        log.info("removed %d temp file(s) left by an interrupted run", removed)
    resolved = config_to_dict(config)
    input_info = {"input_rows": plan.total_rows, "files": [{"uri": f.uri, "rows": f.rows, "columns": f.columns}
                                                       for f in plan.files]}
    if storage.exists(mf.manifest_uri(out)):
        manifest = mf.read_manifest(out, stage="ingest")
        mf.require_same(manifest.config, resolved, SAME_OUTPUT_KEYS, out)
        previous_rows = manifest.extra.get("input_rows")
        if previous_rows is not None and previous_rows != plan.total_rows:
            raise mf.ManifestError(f"{out} was made from an input of {previous_rows} rows; this input has "
                                   f"{plan.total_rows}. Use a new output directory for a different input")
        dropped = [s.name for s in manifest.shards if not shard_files_ok(out, s, config.verify_finished)]
        if dropped:
            log.warning("redoing %d listed shard(s) whose files are missing or changed: %s", len(dropped), dropped)
        manifest.shards = [s for s in manifest.shards if s.name not in dropped]
        manifest.config = resolved
        state = IngestState(config, plan, manifest, dropped)
    else:
        manifest = mf.Manifest(stage="ingest", config=resolved,
                               inputs=[{"uri": f.uri, "kind": "file", "rows": f.rows, "sha256": None}
                                       for f in plan.files])
        state = IngestState(config, plan, manifest)
    state.manifest.extra.update(input_info)
    state.manifest.extra["samples_per_shard"] = config.samples_per_shard
    state.manifest.extra["base_shards"] = state.base_shards
    state.manifest.extra["key_format"] = f"{{shard:0{formats.SHARD_DIGITS}d}}{{index:0{formats.INDEX_DIGITS}d}}"
    state.save()
    return state
