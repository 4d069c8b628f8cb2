"""The datasets one precompute run writes: its output, or one per size with `--resolutions 16,32`.

A `--resolutions` run reads each input shard once (each image decoded once, each caption encoded
once) and writes an ordinary, complete precompute dataset per size in `OUTPUT/<R>px/` (its own
manifest, shards, empty caption, fidelity record), so training takes `--data OUTPUT/16px` as any
other dataset. `OUTPUT/manifest.json` (the parent) lists them with what each stage needs: latent
shape and channels, the autoencoder's scaling factor, the base's in-channels and, for a size that
holds pixels, the upscaler's in-channels, default noise-level range and the lower sizes it can
upscale from. The parent holds no shards: training refuses it, naming the sub-directories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from latentforge import storage
from latentforge.config import config_to_dict
from latentforge.manifest import (MANIFEST_NAME, Manifest, ManifestError, ShardRecord, manifest_digest, read_manifest,
                                  require_same)
from latentforge.precompute.config import PrecomputeConfig, resolution_dir
from latentforge.precompute.stage import Plan, build_manifest, is_parent, plan_run, save

@dataclass
class Target:
    """One dataset the run writes: its single-resolution config (size, output dir), resume plan and records."""

    config: PrecomputeConfig
    plan: Plan
    records: dict[str, ShardRecord] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    latent_shape: list[int] = field(default_factory=list)
    empty: dict[str, Any] = field(default_factory=dict)
    encoder_actors: dict[str, Any] = field(default_factory=dict)
    """What ran (`extra.encoder_actors`); the output bytes do not depend on it."""
    fidelity: dict[str, Any] | None = None
    columns: dict[str, str] = field(default_factory=dict)
    """Row column per writer field (image / meta / latent) of this size in a --resolutions run; {} = as named."""

    def __post_init__(self) -> None:
        self.records = dict(self.plan.done)

    def view(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row of the graph as this dataset's writer reads it: its own size's image, meta and latent."""
        return {**row, **{name: row[col] for name, col in self.columns.items() if col in row}}

    @property
    def label(self) -> str:
        return resolution_dir(self.config.resolution)

    def manifest(self) -> Manifest:
        manifest = build_manifest(self.config, self.plan, self.records, self.models, self.latent_shape,
                                  self.empty, self.fidelity)
        manifest.extra["encoder_actors"] = self.encoder_actors
        return manifest

    def publish(self) -> str:
        """Rewrite this dataset's manifest.json (atomically); its sha256."""
        return save(self.config.output, self.manifest())


def plan_targets(config: PrecomputeConfig) -> list[Target]:
    """The run's datasets and what each still has to encode; refuses an output made another way (exit 2)."""
    if not config.resolutions:
        return [Target(config, plan_run(config))]
    config.check_required()
    check_parent(config)
    subs = {r: config.at_resolution(r) for r in config.resolutions}
    return [Target(sub, plan_run(sub), columns={name: config.column(name, r) for name in ("image", "meta", "latent")})
            for r, sub in subs.items()]


def check_parent(config: PrecomputeConfig) -> None:
    """A --resolutions rerun must find the same sizes, and never a single-resolution dataset, in its output."""
    if not storage.exists(storage.join(config.output, MANIFEST_NAME)):
        return
    previous = read_manifest(config.output, stage="precompute")
    if not is_parent(previous):
        raise ManifestError(f"{config.output} holds a single-resolution precompute dataset, not one per "
                            "--resolutions size; use a new output directory")
    require_same({"resolutions": previous.config.get("resolutions")}, {"resolutions": config.resolutions},
                 ("resolutions",), config.output)


def sub_dirs(data_dir: str, manifest: Manifest) -> list[str]:
    """The dataset directories a parent manifest lists."""
    return [storage.join(data_dir, entry["dir"]) for entry in manifest.extra["resolutions"]]


def parent_manifest(config: PrecomputeConfig, targets: list[Target]) -> Manifest:
    """OUTPUT/manifest.json of a --resolutions run: its datasets and what each stage needs from them."""
    lowest = targets[0].manifest()
    entries = [_entry(t, targets) for t in targets]
    return Manifest(stage="precompute", config=config_to_dict(config), inputs=lowest.inputs,
                    counts=lowest.counts,  # the same samples in every size (a skip in one is a skip in all)
                    models=lowest.models,
                    extra={"resolutions": entries,
                           "complete": all(e["complete"] for e in entries)})


def _entry(target: Target, targets: list[Target]) -> dict[str, Any]:
    manifest = target.manifest()
    channels = int(target.latent_shape[0])
    vae = manifest.models.get("vae", {})
    stages: dict[str, Any] = {"base": {"in_channels": channels, "latent_channels": channels}}
    if target.config.store_pixels:
        stages["upscaler"] = upscaler_stage(target, targets, channels)
    published = storage.exists(storage.join(target.config.output, MANIFEST_NAME))
    return {"resolution": target.config.resolution, "dir": target.label, "latent_shape": list(target.latent_shape),
            "latent_channels": channels, "scaling_factor": vae.get("scaling_factor"),
            "shift_factor": vae.get("shift_factor"), "pixels": bool(manifest.extra["pixels"]),
            "samples": manifest.counts.get("ok", 0), "complete": bool(manifest.extra["complete"]),
            "manifest_sha256": manifest_digest(target.config.output) if published else "", "stages": stages}


def upscaler_stage(target: Target, targets: list[Target], channels: int) -> dict[str, Any]:
    """What an upscaler trained on this size (`jobs/train.py --stage upscaler`) takes, by its defaults."""
    from latentforge.upscaler import DEFAULT_MAX_NOISE_LEVEL
    from latentforge.upscaler.conditioning import IMAGE_CHANNELS

    resolution = target.config.resolution
    lower = [t for t in targets if t.config.resolution < resolution and resolution % t.config.resolution == 0]
    return {"in_channels": channels + IMAGE_CHANNELS, "latent_channels": channels,
            "noise_level_range": [0, DEFAULT_MAX_NOISE_LEVEL],
            "scaling_factor": target.models.get("vae", {}).get("scaling_factor"),
            "lowres_from": [{"resolution": t.config.resolution, "dir": t.label,
                             "lowres_factor": resolution // t.config.resolution} for t in lower]}


def write_parent(config: PrecomputeConfig, targets: list[Target]) -> str:
    """Rewrite OUTPUT/manifest.json of a --resolutions run (atomically); its sha256."""
    return save(config.output, parent_manifest(config, targets))


__all__ = ["Target", "plan_targets", "check_parent", "is_parent", "sub_dirs", "parent_manifest", "write_parent"]
