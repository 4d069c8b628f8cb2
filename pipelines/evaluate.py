"""Evaluate a finished checkpoint: sample the eval set's captions, FID + CLIP score, log to MLflow.

Runs in one process (one GPU when there is one): FID needs every feature of both sets, and the
eval set is small compared with generation at scale (use `pipelines.generate` with `--ray` for
that). The metrics go into this evaluate run and into the training run the export came from, at
the export's step, so the training run's charts show post-hoc evaluations beside in-training ones.
"""

from __future__ import annotations

import logging
import os
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



def _log_to_source(run_id: str, metrics: dict[str, float], step: int, files: list[str], artifact_dir: str) -> None:
    from latentforge import tracking

    log_metrics = getattr(tracking, "log_metrics_to_run", None)
    log_artifact = getattr(tracking, "log_artifact_to_run", None)
    if log_metrics is None or log_artifact is None:  # pragma: no cover - older tracking module
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking.tracking_uri())
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        for f in files:
            client.log_artifact(run_id, f, artifact_dir)
        return
    log_metrics(run_id, metrics, step=step)
    for f in files:
        log_artifact(run_id, f, artifact_dir)


def run(config: EvaluateConfig) -> EvaluateResult:
    from latentforge.evaluation.clip_score import ClipScorer
    from latentforge.evaluation.eval_set import open_eval_set
    from latentforge.evaluation.fid import InceptionFeatures
    from latentforge.evaluation.scoring import score_sampler
    from latentforge.generation.devices import resolve_device, resolve_dtype
    from latentforge.generation.export import load_export
    from latentforge.generation.outputs import save_grid
    from latentforge.generation.sampler import SampleParams
    from latentforge.tracking import StageRun

    config.check_required()
    started = time.monotonic()
    eval_set = open_eval_set(config.eval_set)
    if not config.fid_weights and not config.clip_model:
        log.warning("neither --fid-weights nor --clip-model is set: only samples are made, no metric")
    # Metric models first: a wrong weights file fails before any sampling.
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    inception = InceptionFeatures(config.fid_weights, config.fid_weights_sha256, device=device) \
        if config.fid_weights else None
    clip = ClipScorer(config.clip_model, config.clip_weights, device=device) if config.clip_model else None
    model = load_export(config.model, device=device, dtype=dtype)
    sampler = model.sampler(device=device, dtype=dtype, text_states=config.text_states)
    step = model.step or 0
    out = config.out or storage.join(model.export_dir, "eval", f"step_{step:06d}")
    storage.makedirs(out)
    params = SampleParams(sampler=config.sampler, steps=config.steps, guidance=config.guidance,
                          negative_prompt=config.negative_prompt)
    run_name = config.run_name or f"evaluate-{model.mlflow_run_id or os.path.basename(model.export_dir.rstrip('/'))}"
    tracker = StageRun("evaluate", run_name=run_name, enabled=config.mlflow)
    with tracker as run_:
        run_.log_params(config_to_dict(config))
        run_.log_manifest(config.eval_set, eval_set.manifest_sha256, "input", name="eval_set")
        if model.manifest_sha256:
            run_.log_manifest(model.export_dir, model.manifest_sha256, "input", name="model")
        scored = score_sampler(sampler, eval_set, config.num_samples, params, seed=config.seed,
                               batch_size=config.batch_size, inception=inception, clip=clip,
                               cache_dir=config.cache_dir)
        grid = storage.join(out, "grid.png")
        save_grid(grid, scored.preview, {"eval_set": config.eval_set, "step": step})
        seconds = time.monotonic() - started
        info = {**scored.info, "model": model.export_dir, "step": step, "source_run_id": model.mlflow_run_id,
                "seconds": seconds}
        storage.atomic_write_json(storage.join(out, "metrics.json"), {"metrics": scored.metrics, "info": info})
        run_.log_metrics(scored.metrics, step=step)
        run_.set_tags({k: v for k, v in info.items() if k.startswith(("fid_", "clip_")) and v is not None})
        run_.log_artifact(grid)
        run_.log_artifact(storage.join(out, "metrics.json"))
        logged_to = None
        if config.mlflow and config.log_to_source_run and model.mlflow_run_id:
            named = {f"eval/{k}": v for k, v in scored.metrics.items()}
            _log_to_source(model.mlflow_run_id, named, step, [grid, storage.join(out, "metrics.json")],
                           f"eval/step_{step:06d}")
            logged_to = model.mlflow_run_id
        rows: list[tuple[str, Any]] = [("model", model.export_dir), ("step", step), ("eval set", config.eval_set),
                                       ("samples (N)", int(scored.metrics["num_samples"]))]
        if "fid" in scored.metrics:
            rows += [("FID", f"{scored.metrics['fid']:.4f} (N={int(scored.metrics['fid_num_samples'])})"),
                     ("FID weights sha256", info.get("fid_weights_sha256")), ("FID reference", info.get("fid_reference")),
                     ("FID resize", info.get("fid_resize"))]
        if "clip_score" in scored.metrics:
            rows += [("CLIP score", f"{scored.metrics['clip_score']:.4f}"), ("CLIP model", info.get("clip_model")),
                     ("CLIP formula", info.get("clip_score_formula"))]
        rows += [("logged into run", logged_to or "-"), ("output", out), ("seconds", f"{seconds:.1f}")]
        result = EvaluateResult(scored.metrics, info, out, model.mlflow_run_id, getattr(run_, "run_id", None),
                                summary=reporting.summary_table("evaluate", rows))
    return result
