"""`manifest.json`: what a stage wrote, with which config, from which inputs.

Each stage writes one beside its output and the next stage reads and validates it, so a
mismatch (wrong stage, newer schema, different encoder, edited shard) is refused with a
clear message instead of producing a silently wrong dataset or model.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Iterable

from latentforge import storage

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
STAGES = ("ingest", "autoencoder", "precompute", "train", "export", "generate", "evaluate")


class ManifestError(RuntimeError):
    """A manifest is missing, malformed, from the wrong stage or incompatible with this run."""


@dataclass
class ShardRecord:
    """One finished output shard."""

    name: str
    """Shard stem, e.g. "00003"; the stage's files are derived from it (00003.tar, ...)."""
    samples: int
    """Samples stored in the shard."""
    sha256: str
    """sha256 of the shard's main file (the tar)."""
    files: dict[str, str] = field(default_factory=dict)
    """Other files of this shard (file name -> sha256), e.g. the ingest ledger."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Stage-specific per-shard numbers (status counts, latent mean/std, ...)."""
    size: int | None = None
    """Bytes of the main file, what a resume compares by default (one stat); None in manifests written
    before sizes were recorded, whose shards a resume re-hashes instead."""


@dataclass
class Manifest:
    """The record a stage leaves beside its output."""

    stage: str
    """Which stage wrote the output (one of STAGES)."""
    config: dict[str, Any]
    """The resolved stage config."""
    inputs: list[dict[str, Any]] = field(default_factory=list)
    """What was read: [{"uri": ..., "sha256": ..., "kind": "manifest"|"file", ...}]."""
    shards: list[ShardRecord] = field(default_factory=list)
    """Finished shards, sorted by name."""
    counts: dict[str, int] = field(default_factory=dict)
    """Totals (rows, ok, per skip reason, ...)."""
    models: dict[str, Any] = field(default_factory=dict)
    """Model ids, weight hashes and model constants (scaling factor, widths, ...)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else the next stage needs (latent shape, empty-caption embedding file, ...)."""
    schema_version: int = SCHEMA_VERSION
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ManifestError(f"unknown stage {self.stage!r}; expected one of {STAGES}")
        self.shards = sorted(
            (s if isinstance(s, ShardRecord) else ShardRecord(**s) for s in self.shards),
            key=lambda s: s.name,
        )

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def shard(self, name: str) -> ShardRecord | None:
        return next((s for s in self.shards if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def manifest_uri(dir_uri: str) -> str:
    return storage.join(dir_uri, MANIFEST_NAME)


def write_manifest(dir_uri: str, manifest: Manifest) -> str:
    """Atomically write `dir_uri/manifest.json`; returns its sha256."""
    uri = manifest_uri(dir_uri)
    storage.atomic_write_json(uri, manifest.to_dict())
    return storage.sha256_file(uri)


def read_manifest(dir_uri: str, stage: str | None = None) -> Manifest:
    """Read and validate `dir_uri/manifest.json`, optionally requiring the stage that wrote it."""
    uri = manifest_uri(dir_uri)
    if not storage.exists(uri):
        hint = f" (run the {stage} stage first)" if stage else ""
        raise ManifestError(f"no {MANIFEST_NAME} in {dir_uri}{hint}")
    try:
        data = storage.read_json(uri)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"{uri}: schema version {version}, this LatentForge reads {SCHEMA_VERSION}")
        manifest = Manifest(**data)
    except ManifestError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ManifestError(f"{uri}: malformed manifest ({exc})") from exc
    if stage is not None and manifest.stage != stage:
        raise ManifestError(f"{dir_uri} holds {manifest.stage!r} output, expected {stage!r} output")
    return manifest


def manifest_digest(dir_uri: str) -> str:
    """sha256 of the manifest file: the identity of a stage's output for lineage."""
    return storage.sha256_file(manifest_uri(dir_uri))


def require_same(previous: dict[str, Any], current: dict[str, Any], keys: Iterable[str], what: str) -> None:
    """Refuse to mix outputs made with different settings into one directory."""
    diffs = [f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in keys if previous.get(k) != current.get(k)]
    if diffs:
        raise ManifestError(
            f"{what} already holds output made with different settings ({'; '.join(diffs)}); "
            "use a new output directory or the original settings"
        )
