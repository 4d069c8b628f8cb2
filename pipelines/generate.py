"""Generation at scale: prompts -> PNGs, in-process or through a Ray Data actor pool of samplers.

    from_items([{index, prompt, seed} ...])          # only requests without a finished PNG
      .map_batches(SamplerActor, concurrency=N)      # each actor loads the export once
      .iter_rows()                                   # index rows stream back as PNGs land
    -> index.jsonl + grid.png + manifest.json

Resumable: each PNG is written atomically under its request's position, with its prompt, seed
and sampler settings in its metadata; a rerun skips every request whose PNG is there with the
same prompt/seed/settings, and rebuilds the index from the PNGs. A rerun with different
settings into the same output dir is refused (manifest `require_same`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from latentforge import manifest as mf
from latentforge import reporting, storage
from latentforge.conditioning.spec import ConditionSet
from latentforge.config import config_to_dict
from latentforge.generation.config import GenerateConfig
from latentforge.generation.outputs import (GRID_NAME, INDEX_NAME, Request, as_dict, finished, load_prompts,
                                            read_image, read_png_meta, save_grid, write_index)
from pipelines import upscale
from pipelines.sampling_pool import GenerateResult, open_output, require_same_settings, run_actor_pool

log = logging.getLogger(__name__)
SETTINGS_KEYS = ("model", "sampler", "steps", "guidance", "negative_prompt", "text_states", "init_image",
                 "strength", "height", "width", "dtype", "condition")
PNG_KEYS = ("sampler", "steps", "guidance", "negative_prompt", "text_states", "init_image", "strength", "height",
            "width", "model")


@dataclass
class Target:
    """The export a run samples from, its manifest's digest ("" without one) and the size asked for (None: the
    sampler's default)."""

    export_dir: str
    digest: str
    height: int | None
    width: int | None


def _sampler(config: GenerateConfig, model: Any = None) -> tuple[Any, Any]:
    from latentforge.generation.devices import resolve_device, resolve_dtype
    from latentforge.trained_model import load_export

    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    export = model if model is not None else load_export(config.model, device=device, dtype=dtype)
    return export, export.sampler(device=device, dtype=dtype, text_states=config.text_states)


def _sampler_params(config: GenerateConfig, sampler: Any, height: int | None, width: int | None) -> Any:
    """The sampling params at `height` x `width`, with `--condition` as this sampler's conditions parse it."""
    from latentforge.generation.sampler import SampleParams

    return SampleParams.from_options(config, height, width, sampler.conditions.parse_request(config.condition))


class SamplerActor:
    """A Ray Data callable class: one loaded sampler per actor, a batch of requests per call."""

    def __init__(self, config: dict[str, Any], height: int, width: int, model_ref: str) -> None:
        self.config = GenerateConfig(**config)
        self.height, self.width, self.model_ref = height, width, model_ref
        _, self.sampler = _sampler(self.config)
        self.params = _sampler_params(self.config, self.sampler, height, width)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        import json

        from latentforge.generation.batch_generation import generate_to_dir

        requests = [Request(int(i), str(p), int(s)) for i, p, s in zip(batch["index"], batch["prompt"], batch["seed"])]
        rows = generate_to_dir(self.sampler, requests, self.params, self.config.out,
                               batch_size=self.config.batch_size, init_image=self.config.init_image,
                               strength=self.config.strength, extra_meta={"model": self.model_ref})
        return {"index": [r["index"] for r in rows], "row": [json.dumps(r, default=str) for r in rows]}


def _run_ray(config: GenerateConfig, todo: list[Request], height: int, width: int, model_ref: str) -> Iterator[dict[str, Any]]:
    return run_actor_pool(config, [as_dict(r) for r in todo], SamplerActor,
                          {"height": height, "width": width, "model_ref": model_ref})


def _run_local(config: GenerateConfig, sampler: Any, todo: list[Request], height: int, width: int,
               model_ref: str) -> Iterator[dict[str, Any]]:
    from latentforge.generation.batch_generation import generate_to_dir

    params = _sampler_params(config, sampler, height, width)
    for start in range(0, len(todo), config.batch_size):
        yield from generate_to_dir(sampler, todo[start:start + config.batch_size], params, config.out,
                                   batch_size=config.batch_size, init_image=config.init_image,
                                   strength=config.strength, extra_meta={"model": model_ref})


def _target(config: GenerateConfig) -> Target:
    """The export and the size, checked before any model loads (a bad `--condition`: exit 2)."""
    from latentforge.trained_model import read_data_manifest, resolve_export_dir

    export_dir = resolve_export_dir(config.model)
    data_manifest = read_data_manifest(export_dir)
    resolution = int(data_manifest.extra.get("resolution") or 0) or None
    ConditionSet.from_manifest(data_manifest).parse_request(config.condition)  # exit 2 before any sampling
    if config.init_image and not os.path.isfile(config.init_image):
        raise ValueError(f"--init-image not found: {config.init_image}")
    export_manifest = storage.join(export_dir, mf.MANIFEST_NAME)
    digest = storage.sha256_file(export_manifest) if storage.exists(export_manifest) else ""
    return Target(export_dir, digest, config.height or resolution, config.width or resolution)


def _start_manifest(config: GenerateConfig, target: Target, requests: list[Request]) -> mf.Manifest:
    """The output's manifest, written before any image: a rerun with other settings is refused (exit 2)."""
    settings = {**config.settings(), "model": target.export_dir, "height": target.height, "width": target.width,
                "dtype": config.dtype}
    require_same_settings(config.out, settings, SETTINGS_KEYS)
    manifest = mf.Manifest(stage="generate", config=config_to_dict(config),
                           inputs=[{"uri": target.export_dir, "sha256": target.digest, "kind": "manifest"}],
                           counts={"requests": len(requests)}, extra={"settings": settings})
    mf.write_manifest(config.out, manifest)
    return manifest


def _png_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What a finished PNG records of the settings: a rerun skips the requests whose PNG matches them."""
    png_settings = {k: settings[k] for k in PNG_KEYS}
    if settings["height"] is None:
        png_settings.pop("height"), png_settings.pop("width")
    if png_settings["text_states"] == "auto":  # PNGs record the convention auto resolved to: the export's own
        png_settings.pop("text_states")
    return png_settings


def _log_inputs(tracker: Any, config: GenerateConfig, target: Target) -> None:
    tracker.log_params(config_to_dict(config))
    if target.digest:
        tracker.log_manifest(target.export_dir, target.digest, "input")


def _stream(config: GenerateConfig, target: Target, todo: list[Request]) -> tuple[Iterator[dict[str, Any]], str]:
    """The index rows of `todo` as their PNGs land, and where they are made."""
    if config.ray:
        return _run_ray(config, todo, target.height, target.width, target.export_dir), "Ray Data actor pool"
    _, sampler = _sampler(config)
    height, width = (target.height, target.width) if target.height is not None else (sampler.default_resolution,) * 2
    stream = _run_local(config, sampler, todo, height, width, target.export_dir)
    return stream, f"in-process ({sampler.device})"


def _generate(config: GenerateConfig, target: Target, todo: list[Request],
              done: dict[int, dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], str]:
    """Every request's index row by index (the finished ones and `todo`, made now) and where they were made.
    The index is written even when interrupted, so it lists what is finished."""
    rows = dict(done)
    bar = reporting.progress_bar(len(todo), "generate", "img", config.progress)
    where = "nothing to do"
    try:
        if todo:
            stream, where = _stream(config, target, todo)
            for row in stream:
                rows[row["index"]] = row
                bar.update(1)
    finally:
        bar.close()
        write_index(storage.join(config.out, INDEX_NAME), rows.values())
    return rows, where


def _write_grid(out: str, rows: dict[int, dict[str, Any]], grid_max: int) -> list[dict[str, Any]]:
    """The contact sheet of the first `grid_max` images (none without images); the rows it shows."""
    grid_rows = [rows[i] for i in sorted(rows)][:grid_max]
    if grid_rows:
        images = [read_image(storage.join(out, r["file"])) for r in grid_rows]
        save_grid(storage.join(out, GRID_NAME), images, {"files": ",".join(r["file"] for r in grid_rows)})
    return grid_rows


def _finish_manifest(out: str, manifest: mf.Manifest, rows: dict[int, dict[str, Any]], skipped: int,
                     has_grid: bool) -> str:
    """The manifest with the run's counts, rewritten; its digest."""
    manifest.counts.update(images=len(rows), generated=len(rows) - skipped, skipped=skipped)
    manifest.extra.update(index=INDEX_NAME, grid=GRID_NAME if has_grid else None,
                          truncated_prompts=sum(1 for r in rows.values() if r.get("truncated")))
    return mf.write_manifest(out, manifest)


def _rate(result: GenerateResult) -> float:
    return result.generated / result.seconds if result.seconds > 0 else 0.0


def _log_outputs(tracker: Any, result: GenerateResult, export_dir: str, images: int, has_grid: bool) -> None:
    tracker.log_metrics({"images": images, "generated": result.generated, "skipped": result.skipped,
                         "images_per_s": _rate(result), "seconds": result.seconds})
    tracker.log_manifest(result.out, result.manifest_sha256, "output")
    tracker.set_tags({"latentforge.output_uri": result.out, "latentforge.model": export_dir})
    if has_grid:
        tracker.log_artifact(storage.join(result.out, GRID_NAME))


def _summary(config: GenerateConfig, result: GenerateResult, export_dir: str, truncated: int) -> str:
    return reporting.summary_table("generate", [
        ("model", export_dir), ("prompts", result.total), ("generated", result.generated),
        ("skipped (finished)", result.skipped),
        ("sampler", f"{config.sampler} x {config.steps} steps, guidance {config.guidance}"),
        ("images/s", f"{_rate(result):.2f}"), ("ran", result.extra["where"]), ("output", config.out),
        ("index", storage.join(config.out, INDEX_NAME)), ("grid", storage.join(config.out, GRID_NAME)),
        ("truncated prompts", truncated),
    ])


def run(config: GenerateConfig) -> GenerateResult:
    """Generate every prompt not already finished in `config.out`; returns counts and where things are."""
    from latentforge.tracking import StageRun, default_run_name

    if config.upscaler:  # super-resolution: a cascade or given images (pipelines/upscale.py)
        return upscale.run(config)
    config.check_required()
    started = time.monotonic()
    target = _target(config)
    requests = load_prompts(config.prompts, config.seed)
    open_output(config.out)
    manifest = _start_manifest(config, target, requests)
    done = finished(config.out, requests, _png_settings(manifest.extra["settings"]))
    todo = [r for r in requests if r.index not in done]
    run_name = config.run_name or default_run_name("generate", config.out)
    with StageRun("generate", run_name=run_name, enabled=config.mlflow) as tracker:
        _log_inputs(tracker, config, target)
        rows, where = _generate(config, target, todo, done)
        grid_rows = _write_grid(config.out, rows, config.grid_max)
        seconds = time.monotonic() - started
        digest = _finish_manifest(config.out, manifest, rows, len(done), bool(grid_rows))
        result = GenerateResult(out=config.out, total=len(requests), generated=len(rows) - len(done),
                                skipped=len(done), seconds=seconds, manifest_sha256=digest,
                                mlflow_run_id=getattr(tracker, "run_id", None), extra={"where": where})
        _log_outputs(tracker, result, target.export_dir, len(rows), bool(grid_rows))
        result.summary = _summary(config, result, target.export_dir, manifest.extra["truncated_prompts"])
    return result


__all__ = ["GenerateResult", "SamplerActor", "run", "read_png_meta"]
