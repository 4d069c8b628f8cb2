"""Super-resolution at generate time: `jobs/generate.py --upscaler SR [--model BASE]` (docs/super_resolution.md).

    --upscaler SR --init-images DIR       each image of DIR (sorted by name) -> SR
    --model BASE --upscaler SR1 --upscaler SR2       base txt2img -> SR1 -> SR2, request by request

The chain is checked from the manifests first (sizes, channels: exit 2 before any model loads);
`latentforge.upscaler.cascade` has the rules. Output: NNNNNN.png per request (the last stage's image,
its provenance in the PNG), index.jsonl, grid.png and manifest.json, like plain generation; a rerun
skips the requests whose PNG is there (same prompt, seed, last stage and noise level) and refuses
other settings in the same output dir.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np

from latentforge import manifest as mf
from latentforge import reporting, storage
from latentforge.config import ConfigError, config_to_dict
from latentforge.generation.config import GenerateConfig
from latentforge.generation.outputs import (GRID_NAME, INDEX_NAME, Request, as_dict, finished, load_prompts,
                                           read_image, request_row, save_grid, save_png, write_index)
from latentforge.upscaler.cascade import (Cascade, base_output_size, image_files, load_images, plan_cascade,
                                         run_upscalers, upscaler_params)
from pipelines.sampling_pool import GenerateResult, open_output, require_same_settings, run_actor_pool


def _requests(config: GenerateConfig, count: int | None) -> list[Request]:
    """The prompts; with given images, one prompt per image or one prompt for all of them."""
    requests = load_prompts(config.prompts, config.seed)
    if count is None or len(requests) == count:
        return requests
    if len(requests) == 1:
        return [Request(i, requests[0].prompt, config.seed + i) for i in range(count)]
    raise ConfigError(f"--prompts gives {len(requests)} prompts for {count} --init-images: give one per image "
                      "or a single prompt")


def base_conditions(config: GenerateConfig, cascade: Cascade) -> dict[str, Any]:
    """`--condition` steers the base model (an upscaler's class label is its noise level); checked against
    what the base's data recorded, before any model loads (ConfigError: exit 2)."""
    from latentforge.conditioning.spec import ConditionSet
    from latentforge.trained_model import read_data_manifest

    if not config.condition:
        return {}
    if cascade.base is None:
        raise ConfigError("--condition steers the base model: with --init-images there is none (upscalers take "
                          "no class / scalar conditions)")
    return ConditionSet.from_manifest(read_data_manifest(cascade.base)).parse_request(config.condition)


class Stages:
    """The loaded models of a cascade; `run(requests, images)` -> the last stage's uint8 images."""

    def __init__(self, config: GenerateConfig, cascade: Cascade, conditions: dict[str, Any]) -> None:
        from latentforge.generation.devices import resolve_device, resolve_dtype
        from latentforge.trained_model import load_export
        from latentforge.generation.sampler import SampleParams
        from latentforge.upscaler.sampling import Upscaler

        device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
        self.noise_level, self.device = config.noise_level, device
        size = cascade.input_size
        self.params = SampleParams.from_options(config, size, size, conditions)  # the base's; upscalers take none
        self.upscaler_params = upscaler_params(SampleParams.from_options(config, size, size), config.upscaler_steps,
                                               config.upscaler_guidance)
        self.base = None
        if cascade.base:
            self.base = load_export(cascade.base, device=device, dtype=dtype).sampler(
                device=device, dtype=dtype, text_states=config.text_states)
        self.upscalers = [Upscaler(load_export(d, device=device, dtype=dtype), device, dtype, config.text_states)
                          for d in cascade.upscalers]

    def run(self, requests: list[Request], images: np.ndarray | None) -> tuple[np.ndarray, dict[str, Any]]:
        """uint8 (B, S, S, 3) of the last stage and the meta of its images."""
        prompts, seeds = [r.prompt for r in requests], [r.seed for r in requests]
        if self.base is not None:
            made = self.base.txt2img(prompts, seeds, self.params, len(requests))
            images = np.stack([m.to_uint8() for m in made])  # what a PNG of the base stage stores
        stages = run_upscalers(self.upscalers, images, prompts, seeds, self.upscaler_params, self.noise_level)
        return np.stack([m.to_uint8() for m in stages[-1]]), stages[-1][0].meta


class UpscaleActor:
    """A Ray Data callable class (`--ray`): one loaded cascade per actor, a batch of requests per call."""

    def __init__(self, config: dict[str, Any], cascade: Cascade, conditions: dict[str, Any],
                 extra_meta: dict[str, Any]) -> None:
        self.config = GenerateConfig(**config)
        self.stages = Stages(self.config, cascade, conditions)
        self.extra_meta = extra_meta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        import json

        requests = [Request(int(i), str(p), int(s)) for i, p, s in zip(batch["index"], batch["prompt"], batch["seed"])]
        rows = _write(self.config, requests, self.stages, batch.get("image"), self.extra_meta)  # image: (B, h, w, 3)
        return {"index": [r["index"] for r in rows], "row": [json.dumps(r, default=str) for r in rows]}


def _upscale(config: GenerateConfig, cascade: Cascade, conditions: dict[str, Any], todo: list[Request],
             inputs: np.ndarray | None) -> tuple[list[dict[str, Any]], str]:
    """The rows of the requests made now, in this process or (`--ray`) by a Ray Data actor pool; where.
    A progress bar counts the images as they are written."""
    extra_meta = {"stages": [cascade.base or "input", *cascade.upscalers]}
    if not todo:
        return [], "nothing to do"
    if config.ray:
        items = [{**as_dict(r), **({"image": inputs[r.index]} if inputs is not None else {})} for r in todo]
        actor_kwargs = {"cascade": cascade, "conditions": conditions, "extra_meta": extra_meta}
        stream, where = run_actor_pool(config, items, UpscaleActor, actor_kwargs), "Ray Data actor pool"
    else:
        stages = Stages(config, cascade, conditions)
        stream, where = _local_rows(config, stages, todo, inputs, extra_meta), f"in-process ({stages.device})"
    made, bar = [], reporting.progress_bar(len(todo), "upscale", "img", config.progress)
    try:
        for row in stream:
            made.append(row)
            bar.update(1)
    finally:
        bar.close()
    return made, where


def _local_rows(config: GenerateConfig, stages: Stages, todo: list[Request], inputs: np.ndarray | None,
                extra_meta: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for start in range(0, len(todo), config.batch_size):
        chunk = todo[start:start + config.batch_size]
        chunk_inputs = None if inputs is None else inputs[[r.index for r in chunk]]  # (b, h, w, 3)
        yield from _write(config, chunk, stages, chunk_inputs, extra_meta)


def _write(config: GenerateConfig, requests: list[Request], stages: Stages, inputs: np.ndarray | None,
           extra_meta: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for start in range(0, len(requests), config.batch_size):
        chunk = requests[start:start + config.batch_size]
        images, meta = stages.run(chunk, None if inputs is None else inputs[start:start + config.batch_size])
        for request, image in zip(chunk, images):
            record = {**meta, "prompt": request.prompt, "seed": request.seed, "height": image.shape[0],
                      "width": image.shape[1], **extra_meta}
            sha = save_png(storage.join(config.out, request.file), image, record)
            rows.append({**request_row(request, record), "sha256": sha})
    return rows


def plan(config: GenerateConfig) -> tuple[Cascade, list[str] | None]:
    """The checked chain and the input image files (None with a base model); exit-2 errors only."""
    from latentforge.trained_model import resolve_export_dir

    upscalers = [resolve_export_dir(u) for u in config.upscalers]
    if config.model:
        base = resolve_export_dir(config.model)
        return plan_cascade(base, upscalers, base_output_size(base, config.height, config.width)), None
    return plan_cascade(None, upscalers, None), image_files(config.init_images or "")


def _settings(config: GenerateConfig, cascade: Cascade) -> dict[str, Any]:
    """What fixes the pixels of an upscale output; a rerun into the same dir must keep these."""
    return {"base": cascade.base, "upscalers": cascade.upscalers, "noise_level": config.noise_level,
            "init_images": config.init_images or "", "upscaler_steps": config.upscaler_steps,
            "upscaler_guidance": config.upscaler_guidance, "dtype": config.dtype, **config.settings()}


def _start_manifest(config: GenerateConfig, cascade: Cascade, requests: list[Request]) -> mf.Manifest:
    """The output's manifest, written before any image: a rerun with other settings is refused (exit 2)."""
    settings = _settings(config, cascade)
    require_same_settings(config.out, settings, sorted(settings))
    manifest = mf.Manifest(stage="generate", config=config_to_dict(config), counts={"requests": len(requests)},
                           inputs=[{"uri": d, "kind": "export"} for d in [cascade.base, *cascade.upscalers] if d],
                           extra={"settings": settings, "cascade": settings})
    mf.write_manifest(config.out, manifest)
    return manifest


def _log_inputs(tracker: Any, config: GenerateConfig, cascade: Cascade) -> None:
    tracker.log_params(config_to_dict(config))
    for export_dir in [cascade.base, *cascade.upscalers]:  # lineage: the training runs of every stage
        if export_dir:
            tracker.log_manifest(export_dir, mf.manifest_digest(export_dir), "input")


def _write_outputs(config: GenerateConfig, manifest: mf.Manifest, rows: list[dict[str, Any]], generated: int,
                   skipped: int) -> str:
    """index.jsonl, grid.png and the manifest with the run's counts; the manifest's digest."""
    write_index(storage.join(config.out, INDEX_NAME), rows)
    save_grid(storage.join(config.out, GRID_NAME),
              [read_image(storage.join(config.out, r["file"])) for r in rows[:config.grid_max]])
    manifest.counts.update(images=len(rows), generated=generated, skipped=skipped)
    manifest.extra.update(index=INDEX_NAME, grid=GRID_NAME)
    return mf.write_manifest(config.out, manifest)


def _summary(config: GenerateConfig, cascade: Cascade, images: int, result: GenerateResult) -> str:
    return reporting.summary_table("generate (super-resolution)", [
        ("base", cascade.base or f"--init-images {config.init_images}"), ("upscalers", " -> ".join(cascade.upscalers)),
        ("sizes", f"{cascade.input_size} px -> {cascade.output_size} px"), ("noise level", config.noise_level),
        ("images", images), ("generated", result.generated), ("skipped (finished)", result.skipped),
        ("ran", result.extra["where"]), ("output", config.out)])


def run(config: GenerateConfig) -> GenerateResult:
    """Upscale every request not already finished in `config.out` (its PNG there, same prompt, seed, last stage)."""
    from latentforge.tracking import StageRun, default_run_name

    config.check_required()
    started = time.monotonic()
    cascade, files = plan(config)
    conditions = base_conditions(config, cascade)
    inputs = load_images(files, cascade.input_size) if files else None
    requests = _requests(config, None if inputs is None else len(inputs))
    open_output(config.out)
    manifest = _start_manifest(config, cascade, requests)
    done = finished(config.out, requests, {"upscaler": cascade.upscalers[-1], "noise_level": config.noise_level})
    todo = [r for r in requests if r.index not in done]
    run_name = config.run_name or default_run_name("upscale", config.out)
    with StageRun("generate", run_name=run_name, enabled=config.mlflow) as tracker:
        _log_inputs(tracker, config, cascade)
        made, where = _upscale(config, cascade, conditions, todo, inputs)
        rows = sorted([*done.values(), *made], key=lambda r: r["index"])
        digest = _write_outputs(config, manifest, rows, len(made), len(done))
        seconds = time.monotonic() - started
        tracker.log_metrics({"images": len(rows), "generated": len(made), "seconds": seconds})
        tracker.log_manifest(config.out, digest, "output")
    result = GenerateResult(out=config.out, total=len(requests), generated=len(made), skipped=len(done),
                            seconds=seconds, manifest_sha256=digest, mlflow_run_id=getattr(tracker, "run_id", None),
                            extra={"where": where})
    result.summary = _summary(config, cascade, len(rows), result)
    return result
