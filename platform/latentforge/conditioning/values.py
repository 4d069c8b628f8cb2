"""Precompute's side of the conditions: each sample's values from its ingest metadata, the per-shard
record of what was seen, the manifest's vocabulary / range, and the check of the ingest manifest.

Missing columns (decided in docs/conditioning.md "Missing values"):
- a column that some ingest input file does not have at all is known from the ingest manifest
  (it records each input file's columns): one line, exit 2, before any worker starts;
- a sample whose value is null / empty (or, for a scalar, not a finite number) can only be seen
  while reading: it is skipped and counted as `missing_condition`, like any other skip reason.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from latentforge.conditioning.spec import ConditionColumn, ConditionSpec
from latentforge.config import ConfigError

SKIP_MISSING_CONDITION = "missing_condition"
MEMBER = "cond.json"
"""The latent tar member holding a sample's raw condition values ({name: value})."""


def sample_conditions(meta: dict[str, Any], columns: Sequence[ConditionColumn]) -> dict[str, Any] | None:
    """{name: value} of one sample's ingest metadata, or None when a value is missing or unusable."""
    values: dict[str, Any] = {}
    for column in columns:
        raw = meta.get(column.name)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if column.kind == "class":
            values[column.name] = str(raw).strip()
            continue
        try:
            number = float(raw)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(number):
            return None
        values[column.name] = number
    return values


class ShardConditions:
    """What one shard's stored samples hold: labels per class condition, min / max per scalar."""

    def __init__(self) -> None:
        self.labels: dict[str, set[str]] = {}
        self.ranges: dict[str, list[float]] = {}

    def add(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, str):
                self.labels.setdefault(name, set()).add(value)
            else:
                low, high = self.ranges.get(name, [value, value])
                self.ranges[name] = [min(low, value), max(high, value)]

    def stats(self) -> dict[str, Any]:
        """The shard record's `stats.conditions`."""
        return {**{n: {"labels": sorted(v)} for n, v in self.labels.items()},
                **{n: {"min": lo, "max": hi} for n, (lo, hi) in self.ranges.items()}}


def manifest_conditions(columns: Sequence[ConditionColumn], shard_stats: Iterable[dict[str, Any]]
                        ) -> list[dict[str, Any]]:
    """The manifest's `extra.conditions`: sorted labels (ids by position, null id last) or [min, max]."""
    stats = [s for s in shard_stats if s]
    specs = []
    for column in columns:
        seen = [s[column.name] for s in stats if column.name in s]
        if column.kind == "class":
            labels = sorted({label for s in seen for label in s["labels"]})
            specs.append(ConditionSpec(column.name, "class", labels=labels))
        else:
            specs.append(ConditionSpec(column.name, "scalar", minimum=min((s["min"] for s in seen), default=None),
                                       maximum=max((s["max"] for s in seen), default=None)))
    return [s.record() for s in specs]


def check_ingest_columns(ingest_extra: dict[str, Any], columns: Sequence[ConditionColumn]) -> None:
    """Refuse a condition column some ingest input file lacks (ingest records each file's columns).

    Ingest outputs made before the columns were recorded cannot be checked here: their samples
    are checked one by one (missing -> counted skip).
    """
    files = [f for f in ingest_extra.get("files", []) if "columns" in f and f.get("rows")]
    for column in columns:
        lacking = [str(f.get("uri", "?")).rsplit("/", 1)[-1] for f in files if column.name not in f["columns"]]
        if lacking:
            kept = sorted({c for f in files for c in f["columns"]})
            raise ConfigError(f"condition column {column.name!r} is missing from {len(lacking)} of {len(files)} "
                              f"ingest input file(s) ({', '.join(lacking[:3])}); columns ingest kept: {kept}")
