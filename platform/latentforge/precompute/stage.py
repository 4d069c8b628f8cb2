"""Precompute stage bookkeeping (no Ray): input validation, resume plan, the output manifest."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from latentforge import formats, storage
from latentforge.conditioning.values import check_ingest_columns, manifest_conditions
from latentforge.config import config_to_dict
from latentforge.manifest import (MANIFEST_NAME, Manifest, ManifestError, ShardRecord, manifest_digest, read_manifest,
                                  require_same, write_manifest)
from latentforge.precompute.config import ENCODER_SETTINGS, PrecomputeConfig
from latentforge.precompute.preprocess import preprocessing_record

EMPTY_FILES = ("empty_text.npy", "empty_pooled.npy")
LEGACY_TRUNCATED = "corrupt_shard_tail"
"""Skip reason older versions recorded when they published a shard whose input tar broke off."""


@dataclass
class Plan:
    """What a run has to do: the input, the shards already done (kept), the shards to encode."""

    input_manifest: Manifest
    input_digest: str
    done: dict[str, ShardRecord] = field(default_factory=dict)
    pending: list[ShardRecord] = field(default_factory=list)
    """Input shard records still to encode."""
    previous: Manifest | None = None

    @property
    def pending_rows(self) -> int:
        return sum(s.samples for s in self.pending)


def plan_run(config: PrecomputeConfig) -> Plan:
    """Read the ingest manifest, refuse an incompatible output dir, work out what is left."""
    config.check_required()
    input_manifest = read_manifest(config.input, stage="ingest")
    check_ingest_columns(input_manifest.extra, config.condition_columns)
    digest = manifest_digest(config.input)
    shards = input_manifest.shards[: config.max_shards] if config.max_shards else list(input_manifest.shards)
    previous = None
    done: dict[str, ShardRecord] = {}
    if storage.exists(storage.join(config.output, MANIFEST_NAME)):
        previous = read_manifest(config.output, stage="precompute")
        if is_parent(previous):
            raise ManifestError(f"{config.output} holds one precompute dataset per resolution "
                                f"({', '.join(e['dir'] for e in previous.extra['resolutions'])}); use a new "
                                "output directory, or rerun with its --resolutions")
        require_same(previous.config, config.encoder_settings(), ENCODER_SETTINGS, config.output)
        # Not in ENCODER_SETTINGS: outputs made before the flag existed (no key) hold no pixels and resume.
        require_same({"store_pixels": bool(previous.config.get("store_pixels"))},
                     {"store_pixels": config.store_pixels}, ("store_pixels",), config.output)
        # Not in ENCODER_SETTINGS either: outputs made before conditions existed (no key) resume.
        require_same({"condition": previous.config.get("condition") or []}, {"condition": config.condition},
                     ("condition",), config.output)
        inputs = {s.name: s.sha256 for s in shards}
        done = {r.name: r for r in previous.shards if _still_done(config, r, inputs.get(r.name))}
    pending = [s for s in shards if s.name not in done]
    return Plan(input_manifest, digest, done, pending, previous)


def is_parent(manifest: Manifest) -> bool:
    """Whether a precompute manifest is the parent of a --resolutions run (its datasets are in sub-dirs)."""
    return bool(manifest.extra.get("resolutions"))


def _still_done(config: PrecomputeConfig, record: ShardRecord, input_sha256: str | None) -> bool:
    """Keep a finished shard when its input is unchanged, it is not a partial publish (those are retried)
    and its tar is still the one recorded: by size (a stat), or by sha256 with --verify-finished."""
    if input_sha256 != record.stats.get("input_sha256") or record.stats.get("partial"):
        return False
    if LEGACY_TRUNCATED in record.stats.get("skipped", {}):  # published incomplete by an older version
        return False
    tar = storage.join(config.output, f"{record.name}.tar")
    return storage.matches_record(tar, record.sha256, record.size, config.verify_finished)


def check_models(previous: Manifest | None, models: dict[str, Any], out_dir: str) -> None:
    """Same settings but different weights (a re-uploaded hub model) must not mix either."""
    if previous is None or not previous.models:
        return
    for part, keys in (("vae", ("type", "id", "scaling_factor", "shift_factor", "latent_channels", "downsample")),
                       ("text_encoder", ("name", "weights", "layer", "width", "pooled_dim")),
                       ("weights", ("vae", "text_encoder"))):
        require_same(previous.models.get(part, {}), models.get(part, {}), keys, f"{out_dir} ({part})")


def build_manifest(config: PrecomputeConfig, plan: Plan, records: dict[str, ShardRecord], models: dict[str, Any],
                   latent_shape: list[int], empty: dict[str, Any] | None, fidelity: dict[str, Any] | None
                   ) -> Manifest:
    shards = sorted(records.values(), key=lambda r: r.name)
    counts: Counter = Counter()
    for record in shards:
        counts["samples"] += int(record.stats.get("rows", record.samples))
        counts["ok"] += record.samples
        for reason, n in record.stats.get("skipped", {}).items():
            counts[f"skipped_{reason}"] += int(n)
        if record.stats.get("partial"):  # published with --allow-partial-shards
            counts["partial_shards"] += 1
            counts["lost_samples"] += int(record.stats["partial"]["lost_samples"])
    counts["skipped"] = counts["samples"] - counts["ok"]
    counts["shards"] = len(shards)
    return Manifest(
        stage="precompute",
        config=config_to_dict(config),
        inputs=[{"uri": config.input, "sha256": plan.input_digest, "kind": "manifest"}],
        shards=shards,
        counts=dict(counts),
        models=models,
        extra={
            "dtype": config.dtype,
            "latent": config.latent,
            "latent_shape": list(latent_shape),
            "resolution": config.resolution,
            "text_states": config.text_states,
            "preprocessing": preprocessing_record(config.resolution, config.resize_filter, config.crop, config.seed),
            "empty_caption": empty or {},
            "fidelity": fidelity or {},
            "conditions": manifest_conditions(config.condition_columns, (s.stats.get("conditions") for s in shards)),
            "pixels": pixels_record(config),
            "complete": len(shards) == len(plan.done) + len(plan.pending) and not counts["partial_shards"],
        },
    )


def pixels_record(config: PrecomputeConfig) -> dict[str, Any]:
    """What `extra.pixels` says about the stored images ({} = none stored); the upscaler stage reads it."""
    if not config.store_pixels:
        return {}
    return {"member": formats.PIXELS_MEMBER, "dtype": "uint8", "layout": "HWC",
            "size": [config.resolution, config.resolution]}


def write_empty_caption(out_dir: str, text: Any, pooled: Any, length: int) -> dict[str, Any]:
    """Write empty_text.npy / empty_pooled.npy atomically; their manifest record."""
    for name, array in zip(EMPTY_FILES, (text, pooled)):
        storage.atomic_write_bytes(storage.join(out_dir, name), formats.encode_npy(array))
    return {"files": list(EMPTY_FILES),
            "sha256": {name: storage.sha256_file(storage.join(out_dir, name)) for name in EMPTY_FILES},
            "text_length": length, "caption": ""}


def save(out_dir: str, manifest: Manifest) -> str:
    storage.makedirs(out_dir)
    return write_manifest(out_dir, manifest)


__all__ = ["Plan", "plan_run", "is_parent", "build_manifest", "check_models", "write_empty_caption", "save", "ManifestError"]
