"""Evaluate finished checkpoints and log to MLflow; three modes (docs/evaluation.md):

    --model BASE                     sample the eval set's captions: FID + CLIP score
    --model BASE --upscaler SR [...]  the cascade: FID + CLIP score at every stage's resolution
    --upscaler SR                    SR fidelity on held-out pairs: PSNR / SSIM of SR and of bicubic

Runs in one process (one GPU when there is one): FID needs every feature of both sets, and the
eval set is small compared with generation at scale (use `pipelines.generate` with `--ray` for
that). The metrics go into this evaluate run and into the training run each stage's export came
from, at the export's step, so the training run's charts show post-hoc evaluations beside in-training
ones. Everything that can be checked from manifests and held-out data (cascade sizes, noise level,
held-out image size) is checked before any model loads: one line, exit 2. Only then does the evaluate
run open, before scoring, so a long evaluation shows as running in MLflow and a failed one as FAILED.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from latentforge import reporting, storage
from latentforge.config import config_to_dict
from latentforge.evaluation.config import EvaluateConfig

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    metrics: dict[str, float]
    info: dict[str, Any]
    out: str
    source_run_id: str | None
    mlflow_run_id: str | None = None
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scored:
    """What one mode measured, before it is written and logged."""

    metrics: dict[str, float]
    info: dict[str, Any]
    pictures: dict[str, Any]
    """File name -> uint8 image (HWC) to save and log as an artifact."""
    sources: list[tuple[Any, dict[str, float]]]
    """(export, its metrics): each logged into the training run the export came from, at its step."""
    rows: list[tuple[str, Any]]
    """Mode-specific rows of the summary table."""
    preface: str = ""
    """Printed above the summary table (the SR fidelity side-by-side table)."""


def _metric_models(config: EvaluateConfig, device: Any) -> tuple[Any, Any]:
    """(Inception, CLIP scorer), each None when not configured; a wrong weights file fails before any sampling."""
    from latentforge.evaluation.clip_score import ClipScorer
    from latentforge.evaluation.fid import InceptionFeatures

    if not config.fid_weights and not config.clip_model:
        log.warning("neither --fid-weights nor --clip-model is set: only samples are made, no metric")
    inception = InceptionFeatures(config.fid_weights, config.fid_weights_sha256, device=device) \
        if config.fid_weights else None
    clip = ClipScorer(config.clip_model, config.clip_weights, device=device) if config.clip_model else None
    return inception, clip


def _upscaler_params(config: EvaluateConfig) -> Any:
    from latentforge.generation.sampler import SampleParams
    from latentforge.upscaler.cascade import upscaler_params

    return upscaler_params(SampleParams.from_options(config), config.upscaler_steps, config.upscaler_guidance)


def _metric_rows(metrics: dict[str, float], info: dict[str, Any], suffix: str = "") -> list[tuple[str, Any]]:
    """Summary rows of FID / CLIP score (names ending with `suffix`, e.g. '_32px')."""
    rows: list[tuple[str, Any]] = []
    label = f" at {suffix[1:]}" if suffix else ""
    if f"fid{suffix}" in metrics:
        rows += [(f"FID{label}", f"{metrics[f'fid{suffix}']:.4f} (N={int(metrics[f'fid_num_samples{suffix}'])})")]
    if f"clip_score{suffix}" in metrics:
        rows += [(f"CLIP score{label}", f"{metrics[f'clip_score{suffix}']:.4f}")]
    return rows


def _description_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    named = [("FID weights sha256", "fid_weights_sha256"), ("FID reference", "fid_reference"),
             ("FID resize", "fid_resize"), ("CLIP model", "clip_model"), ("CLIP formula", "clip_score_formula")]
    return [(label, info[key]) for label, key in named if info.get(key) is not None]


@dataclass
class Target:
    """What an evaluation scores and where it is filed, from the manifests alone."""

    kind: str
    """"" (a base model), "cascade" or "sr"."""
    export_dir: str
    """The export the evaluation is named after: the base, or the upscaler for SR fidelity."""
    step: int
    source_run_id: str | None
    manifest_sha256: str | None
    cascade: Any = None
    """The checked chain (cascade mode)."""
    upscaler: dict[str, Any] | None = None
    """The upscaler's `extra.upscaler` record (SR fidelity mode)."""


def _target(config: EvaluateConfig, eval_set: Any) -> Target:
    """Every refusal the manifests allow (cascade sizes, noise level, held-out pixels): before any run starts."""
    from latentforge.evaluation.sr_fidelity import check_held_out
    from latentforge.trained_model import export_identity, resolve_export_dir
    from latentforge.upscaler.cascade import upscaler_manifest_record
    from latentforge.upscaler.conditioning import check_noise_level

    cascade, record = None, None
    if not config.model:
        kind, export_dir = "sr", resolve_export_dir(config.upscalers[0])
        record = upscaler_manifest_record(export_dir)
        check_noise_level(config.noise_level, int(record["noise_level_range"][1]))
        check_held_out(eval_set, int(record["resolution"]))
    elif config.upscalers:
        cascade = _plan_cascade(config)
        kind, export_dir = "cascade", cascade.base
    else:
        kind, export_dir = "", resolve_export_dir(config.model)
    step, source_run_id, digest = export_identity(export_dir)
    return Target(kind, export_dir, step or 0, source_run_id, digest, cascade, record)


def _score_base(config: EvaluateConfig, eval_set: Any, target: Target, device: Any, dtype: Any) -> Scored:
    from latentforge.evaluation.scoring import score_sampler
    from latentforge.trained_model import load_export
    from latentforge.generation.sampler import SampleParams

    inception, clip = _metric_models(config, device)
    model = load_export(target.export_dir, device=device, dtype=dtype)
    sampler = model.sampler(device=device, dtype=dtype, text_states=config.text_states)
    scored = score_sampler(sampler, eval_set, config.num_samples, SampleParams.from_options(config), seed=config.seed,
                           batch_size=config.batch_size, inception=inception, clip=clip, cache_dir=config.cache_dir)
    rows = [("samples (N)", int(scored.metrics["num_samples"])), *_metric_rows(scored.metrics, scored.info),
            *_description_rows(scored.info)]
    return Scored(scored.metrics, scored.info, {"grid.png": scored.preview}, [(model, scored.metrics)], rows)


def _plan_cascade(config: EvaluateConfig) -> Any:
    """The checked chain (sizes, channels, noise level) from the manifests alone."""
    from latentforge.trained_model import resolve_export_dir
    from latentforge.upscaler.cascade import base_output_size, plan_cascade, upscaler_manifest_record
    from latentforge.upscaler.conditioning import check_noise_level

    base, upscalers = resolve_export_dir(config.model), [resolve_export_dir(u) for u in config.upscalers]
    cascade = plan_cascade(base, upscalers, base_output_size(base, None, None))
    for export_dir in upscalers:
        check_noise_level(config.noise_level, int(upscaler_manifest_record(export_dir)["noise_level_range"][1]))
    return cascade


def _score_cascade(config: EvaluateConfig, eval_set: Any, target: Target, device: Any, dtype: Any) -> Scored:
    from latentforge.evaluation.scoring import score_cascade
    from latentforge.trained_model import load_export
    from latentforge.generation.sampler import SampleParams
    from latentforge.upscaler.sampling import Upscaler

    cascade = target.cascade
    inception, clip = _metric_models(config, device)
    model = load_export(cascade.base, device=device, dtype=dtype)
    exports = [load_export(d, device=device, dtype=dtype) for d in cascade.upscalers]
    upscalers = [Upscaler(e, device, dtype, config.text_states) for e in exports]
    scored = score_cascade(model.sampler(device=device, dtype=dtype, text_states=config.text_states), upscalers,
                           eval_set, config.num_samples, SampleParams.from_options(config), config.noise_level,
                           seed=config.seed, batch_size=config.batch_size, inception=inception, clip=clip,
                           cache_dir=config.cache_dir,
                           upscaler_params=_upscaler_params(config))
    sizes = scored.info["resolutions"]
    sources = [(export, {k: v for k, v in scored.metrics.items() if k.endswith(f"_{size}px")})
               for export, size in zip([model, *exports], sizes)]
    rows: list[tuple[str, Any]] = [("upscalers", " -> ".join(cascade.upscalers)), ("noise level", config.noise_level),
                                   ("samples (N)", int(scored.metrics["num_samples"]))]
    for size in sizes:
        rows += _metric_rows(scored.metrics, scored.info, f"_{size}px")
    pictures = {f"grid_{size}px.png": images for size, images in scored.previews.items()}
    return Scored(scored.metrics, scored.info, pictures, sources, rows + _description_rows(scored.info))


def _score_sr(config: EvaluateConfig, eval_set: Any, target: Target, device: Any, dtype: Any) -> Scored:
    from latentforge.evaluation.sr_fidelity import comparison_picture, fidelity_table, held_out_images, sr_fidelity
    from latentforge.trained_model import load_export
    from latentforge.upscaler.sampling import Upscaler

    record = target.upscaler
    held = held_out_images(eval_set, int(record["resolution"]), config.num_samples)
    export = load_export(target.export_dir, device=device, dtype=dtype)
    params = _upscaler_params(config)
    result = sr_fidelity(Upscaler(export, device, dtype, config.text_states), held, params,
                         config.noise_level, seed=config.seed, batch_size=config.batch_size,
                         degradation_seed=config.seed)
    info = {"eval_set": config.eval_set, "keys": held.keys, "noise_level": config.noise_level,
            "sampler": config.sampler, "steps": params.steps, "guidance": params.guidance, "seed": config.seed,
            "lowres_size": result.lowres_size, "resolution": result.resolution,
            "degradation": {**record.get("degradation", {}), "factor": record["lowres_factor"], "seed": config.seed},
            "metric": "torchmetrics PSNR (data_range 1, all pixels) / SSIM (Gaussian window, mean over images)"}
    rows = [("held-out pairs", len(held.keys)), ("noise level", config.noise_level),
            ("SR PSNR gain over bicubic", f"{result.metrics['sr_psnr_gain_db']:+.2f} dB")]
    return Scored(result.metrics, info, {"comparison.png": comparison_picture(result)}, [(export, result.metrics)],
                  rows, preface=fidelity_table(result))


def _save_pictures(out: str, pictures: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    from latentforge.generation.outputs import png_bytes, save_grid

    paths = []
    for name, picture in pictures.items():
        path = storage.join(out, name)
        if isinstance(picture, list):
            save_grid(path, picture, meta)
        else:
            storage.atomic_write_bytes(path, png_bytes(picture, meta))
        paths.append(path)
    return paths


def _log_to_sources(scored: Scored, files: list[str]) -> list[str]:
    """Each stage's metrics (as eval/NAME) and the files into its training run; the run ids logged into."""
    from latentforge.tracking import log_artifact_to_run, log_metrics_to_run

    logged = []
    for export, metrics in scored.sources:
        if not export.mlflow_run_id:
            continue
        step = export.step or 0
        log_metrics_to_run(export.mlflow_run_id, {f"eval/{k}": v for k, v in metrics.items()}, step=step)
        for path in files:
            log_artifact_to_run(export.mlflow_run_id, path, f"eval/step_{step:06d}")
        logged.append(export.mlflow_run_id)
    return logged


MODES = {"": _score_base, "cascade": _score_cascade, "sr": _score_sr}


def _out_dir(config: EvaluateConfig, target: Target) -> str:
    """`--out`, or eval/[KIND_]step_NNNNNN beside the export; made if missing."""
    out = config.out or storage.join(target.export_dir, "eval",
                                     f"{target.kind + '_' if target.kind else ''}step_{target.step:06d}")
    storage.makedirs(out)
    return out


def _log_inputs(tracker: Any, config: EvaluateConfig, eval_set: Any, target: Target) -> None:
    tracker.log_params(config_to_dict(config))
    tracker.log_manifest(config.eval_set, eval_set.manifest_sha256, "input", name="eval_set")
    if target.manifest_sha256:
        tracker.log_manifest(target.export_dir, target.manifest_sha256, "input", name="model")


def _write_results(config: EvaluateConfig, out: str, scored: Scored, target: Target,
                   started: float) -> tuple[list[str], dict[str, Any]]:
    """The pictures and metrics.json in `out`; the files written and the run's info."""
    files = _save_pictures(out, scored.pictures, {"eval_set": config.eval_set, "step": target.step})
    seconds = time.monotonic() - started
    info = {**scored.info, "model": target.export_dir, "step": target.step, "source_run_id": target.source_run_id,
            "seconds": seconds}
    files.append(storage.join(out, "metrics.json"))
    storage.atomic_write_json(files[-1], {"metrics": scored.metrics, "info": info})
    return files, info


def _log_outputs(tracker: Any, scored: Scored, info: dict[str, Any], files: list[str], step: int) -> None:
    tracker.log_metrics(scored.metrics, step=step)
    tracker.set_tags({k: v for k, v in info.items() if k.startswith(("fid_", "clip_")) and v is not None})
    for path in files:
        tracker.log_artifact(path)


def _result(config: EvaluateConfig, target: Target, scored: Scored, info: dict[str, Any], out: str,
            logged_to: list[str], run_id: str | None) -> EvaluateResult:
    rows = [("model", target.export_dir), ("step", target.step), ("eval set", config.eval_set), *scored.rows,
            ("logged into run", ", ".join(logged_to) or "-"), ("output", out), ("seconds", f"{info['seconds']:.1f}")]
    table = reporting.summary_table("evaluate", rows)
    return EvaluateResult(scored.metrics, info, out, target.source_run_id, run_id,
                          summary=f"{scored.preface}\n\n{table}" if scored.preface else table)


def run(config: EvaluateConfig) -> EvaluateResult:
    from latentforge.evaluation.eval_set import open_eval_set
    from latentforge.generation.devices import resolve_device, resolve_dtype
    from latentforge.tracking import StageRun, default_run_name

    config.check_required()
    started = time.monotonic()
    eval_set = open_eval_set(config.eval_set)
    target = _target(config, eval_set)
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    out = _out_dir(config, target)
    run_name = config.run_name or default_run_name("evaluate", target.source_run_id or target.export_dir)
    # The run is open while scoring: a long evaluation shows as running, a failed one as failed.
    with StageRun("evaluate", run_name=run_name, enabled=config.mlflow) as tracker:
        _log_inputs(tracker, config, eval_set, target)
        scored = MODES[target.kind](config, eval_set, target, device, dtype)
        files, info = _write_results(config, out, scored, target, started)
        _log_outputs(tracker, scored, info, files, target.step)
        logged_to = _log_to_sources(scored, files) if config.mlflow and config.log_to_source_run else []
        result = _result(config, target, scored, info, out, logged_to, getattr(tracker, "run_id", None))
    return result
