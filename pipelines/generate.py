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
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from latentforge import manifest as mf
from latentforge import reporting, storage
from latentforge.conditioning.spec import ConditionSet
from latentforge.config import ConfigError, config_to_dict
from latentforge.generation.config import GenerateConfig
from latentforge.generation.outputs import (GRID_NAME, INDEX_NAME, Request, as_dict, finished, load_prompts,
                                            read_png_meta, save_grid, write_index)

log = logging.getLogger(__name__)
SETTINGS_KEYS = ("model", "sampler", "steps", "guidance", "negative_prompt", "text_states", "init_image",
                 "strength", "height", "width", "dtype", "condition")


@dataclass
class GenerateResult:
    out: str
    total: int
    generated: int
    skipped: int
    seconds: float
    manifest_sha256: str
    mlflow_run_id: str | None = None
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)



def _sampler(config: GenerateConfig, model: Any = None) -> tuple[Any, Any]:
    from latentforge.generation.devices import resolve_device, resolve_dtype
    from latentforge.trained_model import load_export

    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    export = model if model is not None else load_export(config.model, device=device, dtype=dtype)
    return export, export.sampler(device=device, dtype=dtype, text_states=config.text_states)


def _params(config: GenerateConfig, height: int, width: int, conditions: dict[str, Any] | None = None) -> Any:
    from latentforge.generation.sampler import SampleParams

    return SampleParams(sampler=config.sampler, steps=config.steps, guidance=config.guidance,
                        negative_prompt=config.negative_prompt, height=height, width=width,
                        conditions=conditions or {})


class SamplerActor:
    """A Ray Data callable class: one loaded sampler per actor, a batch of requests per call."""

    def __init__(self, config: dict[str, Any], height: int, width: int, model_ref: str) -> None:
        self.config = GenerateConfig(**config)
        self.height, self.width, self.model_ref = height, width, model_ref
        _, self.sampler = _sampler(self.config)
        self.params = _params(self.config, height, width, self.sampler.conditions.parse_request(self.config.condition))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        import json

        from latentforge.generation.batch_generation import generate_to_dir

        requests = [Request(int(i), str(p), int(s)) for i, p, s in zip(batch["index"], batch["prompt"], batch["seed"])]
        rows = generate_to_dir(self.sampler, requests, self.params, self.config.out,
                               batch_size=self.config.batch_size, init_image=self.config.init_image,
                               strength=self.config.strength, extra_meta={"model": self.model_ref})
        return {"index": [r["index"] for r in rows], "row": [json.dumps(r, default=str) for r in rows]}


def run_actor_pool(config: GenerateConfig, items: list[dict[str, Any]], actor: type,
                   actor_kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`items` (one request each) through a Ray Data pool of `actor(config=..., **actor_kwargs)`, each call
    a batch that the actor writes to `config.out`; yields the index rows it returns as they finish."""
    import json

    import ray
    import ray.data

    from pipelines.runtime import init_ray

    init_ray(log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    gpus = config.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    actor_config = config_to_dict(config)
    if gpus == 0 and actor_config["device"] == "auto":
        actor_config["device"] = "cpu"
    blocks = max(1, min(len(items), config.concurrency * 4))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(actor, batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.concurrency),
                        num_cpus=config.num_cpus_per_actor, num_gpus=gpus, batch_format="numpy",
                        fn_constructor_kwargs={"config": actor_config, **actor_kwargs})
    for row in ds.iter_rows():
        yield json.loads(row["row"])


def _run_ray(config: GenerateConfig, todo: list[Request], height: int, width: int, model_ref: str) -> Iterator[dict[str, Any]]:
    return run_actor_pool(config, [as_dict(r) for r in todo], SamplerActor,
                          {"height": height, "width": width, "model_ref": model_ref})


def _run_local(config: GenerateConfig, sampler: Any, todo: list[Request], height: int, width: int,
               model_ref: str) -> Iterator[dict[str, Any]]:
    from latentforge.generation.batch_generation import generate_to_dir

    params = _params(config, height, width, sampler.conditions.parse_request(config.condition))
    for start in range(0, len(todo), config.batch_size):
        yield from generate_to_dir(sampler, todo[start:start + config.batch_size], params, config.out,
                                   batch_size=config.batch_size, init_image=config.init_image,
                                   strength=config.strength, extra_meta={"model": model_ref})


def run(config: GenerateConfig) -> GenerateResult:
    """Generate every prompt not already finished in `config.out`; returns counts and where things are."""
    from latentforge.tracking import StageRun, default_run_name
    from latentforge.trained_model import read_data_manifest, resolve_export_dir

    if config.upscaler:  # super-resolution: a cascade or given images (pipelines/upscale.py)
        from pipelines.upscale import run as run_upscale

        return run_upscale(config)
    config.check_required()
    started = time.monotonic()
    export_dir = resolve_export_dir(config.model)
    data_manifest = read_data_manifest(export_dir if "://" not in export_dir else export_dir)
    resolution = int(data_manifest.extra.get("resolution") or 0) or None
    ConditionSet.from_manifest(data_manifest).parse_request(config.condition)  # exit 2 before any sampling
    height, width = config.height or resolution, config.width or resolution
    if config.init_image and not os.path.isfile(config.init_image):
        raise ValueError(f"--init-image not found: {config.init_image}")
    requests = load_prompts(config.prompts, config.seed)
    storage.makedirs(config.out)
    storage.remove_stale_temps(config.out)

    export_manifest = storage.join(export_dir, mf.MANIFEST_NAME)
    export_digest = storage.sha256_file(export_manifest) if storage.exists(export_manifest) else ""
    settings = {**config.settings(), "model": export_dir, "height": height, "width": width, "dtype": config.dtype}
    if storage.exists(mf.manifest_uri(config.out)):
        previous = mf.read_manifest(config.out, stage="generate")
        try:
            mf.require_same(previous.extra.get("settings", {}), settings, SETTINGS_KEYS, config.out)
        except mf.ManifestError as exc:  # a usage error: exit 2 like any bad option
            raise ConfigError(str(exc)) from exc
    manifest = mf.Manifest(stage="generate", config=config_to_dict(config),
                           inputs=[{"uri": export_dir, "sha256": export_digest, "kind": "manifest"}],
                           counts={"requests": len(requests)}, extra={"settings": settings})
    mf.write_manifest(config.out, manifest)

    png_settings = {k: settings[k] for k in ("sampler", "steps", "guidance", "negative_prompt", "text_states",
                                              "init_image", "strength", "height", "width")}
    png_settings["model"] = export_dir
    if height is None:
        png_settings.pop("height"), png_settings.pop("width")
    if png_settings["text_states"] == "auto":  # PNGs record the convention auto resolved to: the export's own
        png_settings.pop("text_states")
    done = finished(config.out, requests, png_settings)
    todo = [r for r in requests if r.index not in done]
    run_name = config.run_name or default_run_name("generate", config.out)
    tracker = StageRun("generate", run_name=run_name, enabled=config.mlflow)
    rows = dict(done)
    with tracker as run_:
        run_.log_params(config_to_dict(config))
        if export_digest:
            run_.log_manifest(export_dir, export_digest, "input")
        bar = reporting.progress_bar(len(todo), "generate", "img", config.progress)
        where = "nothing to do"
        try:
            if todo:
                if config.ray:
                    where = "Ray Data actor pool"
                    stream = _run_ray(config, todo, height, width, export_dir)
                else:
                    _, sampler = _sampler(config)
                    where = f"in-process ({sampler.device})"
                    if height is None:
                        height = width = sampler.default_resolution
                    stream = _run_local(config, sampler, todo, height, width, export_dir)
                for row in stream:
                    rows[row["index"]] = row
                    bar.update(1)
        finally:
            bar.close()
            write_index(storage.join(config.out, INDEX_NAME), rows.values())
        ordered = [rows[i] for i in sorted(rows)]
        grid_rows = ordered[:config.grid_max]
        if grid_rows:
            from PIL import Image

            images = []
            for r in grid_rows:
                fs, p = storage.filesystem(storage.join(config.out, r["file"]))
                with fs.open(p, "rb") as handle:
                    images.append(np.asarray(Image.open(handle).convert("RGB")))
            save_grid(storage.join(config.out, GRID_NAME), images, {"files": ",".join(r["file"] for r in grid_rows)})
        seconds = time.monotonic() - started
        generated = len(rows) - len(done)
        manifest.counts = {"requests": len(requests), "images": len(rows), "generated": generated,
                           "skipped": len(done)}
        manifest.extra.update(index=INDEX_NAME, grid=GRID_NAME if grid_rows else None,
                              truncated_prompts=sum(1 for r in rows.values() if r.get("truncated")))
        digest = mf.write_manifest(config.out, manifest)
        rate = generated / seconds if seconds > 0 else 0.0
        run_.log_metrics({"images": len(rows), "generated": generated, "skipped": len(done),
                          "images_per_s": rate, "seconds": seconds})
        run_.log_manifest(config.out, digest, "output")
        run_.set_tags({"latentforge.output_uri": config.out, "latentforge.model": export_dir})
        if grid_rows:
            run_.log_artifact(storage.join(config.out, GRID_NAME))
        result = GenerateResult(out=config.out, total=len(requests), generated=generated, skipped=len(done),
                                seconds=seconds, manifest_sha256=digest, mlflow_run_id=getattr(run_, "run_id", None),
                                extra={"where": where})
        result.summary = reporting.summary_table("generate", [
            ("model", export_dir), ("prompts", len(requests)), ("generated", generated), ("skipped (finished)", len(done)),
            ("sampler", f"{config.sampler} x {config.steps} steps, guidance {config.guidance}"),
            ("images/s", f"{rate:.2f}"), ("ran", where), ("output", config.out),
            ("index", storage.join(config.out, INDEX_NAME)), ("grid", storage.join(config.out, GRID_NAME)),
            ("truncated prompts", manifest.extra["truncated_prompts"]),
        ])
    return result


__all__ = ["GenerateResult", "SamplerActor", "run", "read_png_meta"]
