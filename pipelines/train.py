"""Train as a Ray Train graph: latent shards --Ray Data--> TorchTrainer workers running Accelerate.

    driver: read + check the precompute manifest, resolve and check the UNet against it, plan the
            data order, refuse node-local storage on a multi-machine cluster, open (or reopen)
            the run's single MLflow run, then TorchTrainer.fit()
    worker: Accelerator (DDP over Ray's process group, mixed precision) + DiffusionTrainer;
            its own Ray Data stream (`get_dataset_shard("train_rank{R}")`) over the shards of
            its fixed sample range, decoded/collated by a prefetch thread in a deterministic
            order; checkpoints through `ray.train.report(checkpoint=...)`; rank 0 logs metrics
            asynchronously, prints progress, runs validation / in-training eval and exports.

Exact resume: the sample order is a pure function of (manifest, world size, seed, epoch) - see
`latentforge.training.data` - so the data position in a checkpoint is just the step count; a
restarted worker skips exactly the samples it had consumed. Ray Train restores the latest
checkpoint both after a worker failure (FailureConfig) and when the same run name is rerun.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from latentforge import storage
from latentforge.config import ConfigError, config_to_dict
from latentforge.manifest import Manifest, ManifestError, manifest_digest, read_manifest
from latentforge.conditioning.embedding import with_conditions
from latentforge.conditioning.spec import ConditionSet
from latentforge.models.unet import UNetConfigError, check_latent_size, resolve_unet_config
from latentforge.reporting import summary_table
from latentforge.tracking import StageRun, default_run_name, tracking_uri
from latentforge.training import data as tdata
from latentforge.training import run_storage
from latentforge.training.config import TrainConfig
from latentforge.upscaler.training import upscaler_setup, upscaler_unet
from pipelines.train_worker import train_worker

log = logging.getLogger("latentforge.train")

@dataclass
class TrainResult:
    run_name: str
    export_uri: str
    mlflow_run_id: str | None
    step: int
    summary: str
    metrics: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def check_data(config: TrainConfig, manifest: Manifest) -> dict[str, Any]:
    """The UNet config, checked against the latents before any worker starts."""
    tdata.require_one_dataset(config.data, manifest)
    vae = manifest.models.get("vae") or {}
    text = manifest.models.get("text_encoder") or {}
    shape = manifest.extra.get("latent_shape")
    if not shape or "latent_channels" not in vae or "width" not in text:
        raise ConfigError(f"{config.data}: the precompute manifest lacks models.vae.latent_channels, "
                          "models.text_encoder.width or extra.latent_shape")
    channels, height, width = int(shape[0]), int(shape[1]), int(shape[2])
    if channels != int(vae["latent_channels"]):
        raise ConfigError(f"{config.data}: latent_shape {shape} disagrees with vae.latent_channels "
                          f"{vae['latent_channels']}")
    if manifest.extra.get("latent", "mean") not in ("mean", "mean_std"):
        raise ConfigError(f"{config.data}: unknown latent kind {manifest.extra.get('latent')!r}")
    if config.stage == "upscaler":
        unet_config = upscaler_unet(config, manifest, channels, int(text["width"]), height)
    else:
        unet_config = resolve_unet_config(config.unet, channels, int(text["width"]), sample_size=height)
    unet_config = with_conditions(unet_config, ConditionSet.from_manifest(manifest))
    check_latent_size(unet_config, height, width)
    return unet_config


def _worker_nodes() -> list[dict[str, Any]]:
    """Alive Ray nodes that can host a training worker (a CPU or a GPU)."""
    import ray

    return [n for n in ray.nodes()
            if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]


def _node_addresses() -> list[str]:
    return [n["NodeManagerAddress"] for n in _worker_nodes()]


def _storage_view(path: str, marker: str) -> str:
    """On a node: a key of run_storage.STORAGE_VIEWS for what it sees at the driver's storage path."""
    return "same" if os.path.exists(marker) else "other" if os.path.isdir(path) else "missing"


def _storage_views(path: str) -> dict[str, str]:
    """Node address -> what that node sees at local `path`, judged by a marker file the driver writes."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, f".latentforge-shared-check-{uuid.uuid4().hex}")
    open(marker, "w").close()
    try:
        # num_cpus=0: the check must run even where training workers already hold every CPU.
        probe = ray.remote(num_cpus=0)(_storage_view)
        refs = {n["NodeManagerAddress"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(path, marker) for n in _worker_nodes()}
        return dict(zip(refs, ray.get(list(refs.values()), timeout=120)))
    finally:
        os.remove(marker)


def read_data_manifest(data: str, stage: str) -> tuple[str, Any]:
    """`--data` made absolute (a local path means the same on every node) and its `stage` manifest;
    a missing flag or a wrong / unreadable manifest is a ConfigError (exit 2)."""
    if not data:
        raise ConfigError(f"--data is required (the {stage} stage's output directory or URI)")
    data = data if "://" in data else os.path.abspath(data)
    try:
        return data, read_manifest(data, stage=stage)
    except ManifestError as exc:
        raise ConfigError(str(exc)) from exc


def _absolute_storage(path: str) -> str:
    if run_storage.is_local_path(path):
        return os.path.abspath(path[len("file://"):] if path.startswith("file://") else path)
    return path


def build_datasets(config: TrainConfig, plan: tdata.DataPlan) -> dict[str, Any]:
    """One Ray Data stream per rank over the shards of its range (tar bytes only; decoding is in the worker)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {}
    for rank in range(plan.world_size):
        paths = [storage.join(config.data, f"{name}.tar") for name in plan.rank_shards(rank)]
        paths *= plan.epochs_per_stream(rank)  # several epochs per execution (see DataPlan)
        # num_cpus=0: these tasks only read bytes; the training workers may hold every CPU.
        datasets[f"train_rank{rank}"] = ray.data.read_webdataset(
            paths, decoder=None, suffixes=list(tdata.TAR_FIELDS), num_cpus=0, override_num_blocks=len(paths),
            concurrency=config.read_concurrency)
    return datasets


def _eval_failures_text(summary: dict[str, Any]) -> str:
    count = int(summary.get("eval_failures", 0))
    return f"{count} (last: {summary['eval_last_failure']})" if count else "0"


def run(config: TrainConfig) -> TrainResult:
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.process_group import NodeInterfaceTorchConfig
    from pipelines.runtime import init_ray

    config.data, manifest = read_data_manifest(config.data, "precompute")
    try:
        unet_config = check_data(config, manifest)
    except UNetConfigError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        plan = tdata.plan_data(manifest, config.num_workers, config.samples_per_step, config.shuffle_buffer,
                               config.seed, config.val_samples)
    except tdata.DataPlanError as exc:
        raise ConfigError(str(exc)) from exc
    if config.eval_prompts:
        from latentforge.evaluation.in_training import check_can_start

        check_can_start(config.eval_config(), config.data, manifest)  # before any worker exists
    if config.export_formats:
        from pipelines.export import preflight

        upscaler = upscaler_setup(config, manifest).record(manifest) if config.stage == "upscaler" else None
        preflight(manifest, config.export_formats, config.mlflow, upscaler)  # refused now, not after training
    config.run_name = config.run_name or default_run_name("train")
    config.storage_path = _absolute_storage(config.storage_path)
    where = init_ray(trains=True)
    nodes = _node_addresses()
    run_storage.check_storage(config.storage_path, nodes, config.storage_is_shared)
    if config.storage_is_shared and run_storage.is_local_path(config.storage_path) and len(set(nodes)) > 1:
        run_storage.check_storage_seen(config.storage_path, _storage_views(config.storage_path),
                                ray.util.get_node_ip_address())
    if config.mlflow and len(set(nodes)) > 1 and tracking_uri().startswith("sqlite:"):
        log.warning("MLflow logs to a local sqlite file (%s) but the cluster spans several machines: rank 0 may "
                    "run elsewhere and log to its own file. Set MLFLOW_TRACKING_URI to a tracking server.",
                    tracking_uri())

    digest = manifest_digest(config.data)
    previous = run_storage.read_run_state(config.storage_path, config.run_name)
    if previous is not None:
        run_storage.check_resume(previous, config.data, digest, config.run_name)
        try:
            tdata.check_same_plan(previous.get("data_plan", {}), plan)
        except tdata.DataPlanError as exc:
            raise ConfigError(f"cannot resume run {config.run_name!r}: {exc}") from exc
        print(f"train: run {config.run_name!r} exists; resuming from its latest checkpoint", flush=True)
    resolved = config_to_dict(config)
    export_uri = run_storage.export_dir(config.storage_path, config.run_name)
    started = time.time()
    with StageRun("train", run_name=config.run_name, run_id=(previous or {}).get("mlflow_run_id"),
                  enabled=config.mlflow) as run:
        if previous is None:
            run_storage.write_run_state(config.storage_path, config.run_name, {
                "mlflow_run_id": run.run_id, "data_dir": config.data, "data_manifest_sha256": digest,
                "data_plan": plan.to_dict(),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            run.log_params({**resolved, "derived": {
                "global_batch": config.global_batch, "steps_per_epoch": plan.steps_per_epoch,
                "train_samples": plan.train_total, "val_samples": plan.val_samples,
                "unet_parameters_config": json.dumps(unet_config, sort_keys=True)[:5000]}})
            run.log_manifest(config.data, digest, "input")
        loop_config = {
            "config": resolved, "unet_config": unet_config, "manifest": manifest.to_dict(), "plan": plan.to_dict(),
            "data_digest": digest, "mlflow_run_id": run.run_id,
            "tracking_uri": tracking_uri() if config.mlflow else None,  # tracking_uri() makes ./mlruns
            "export_uri": export_uri,
        }
        ingest = DataConfig.default_ingest_options()
        ingest.preserve_order = True  # the per-rank order must be the file order (exact resume)
        ingest.verbose_progress = False
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=loop_config,
            torch_config=NodeInterfaceTorchConfig(),  # gloo/NCCL on each node's Ray address, not loopback
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                         resources_per_worker={"CPU": config.cpus_per_worker},
                                         placement_strategy=config.placement_strategy),
            run_config=RunConfig(
                name=config.run_name, storage_path=config.storage_path,
                checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                failure_config=FailureConfig(max_failures=config.max_failures)),
            datasets=build_datasets(config, plan),
            dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise RuntimeError(f"training failed after {config.max_failures} restart(s): {exc}") from exc
        export = read_manifest(export_uri, stage="train")
        export_digest = manifest_digest(export_uri)
        run.set_tags({"latentforge.export_uri": export_uri})
        run.log_manifest(export_uri, export_digest, "output", name=f"{config.run_name}-export")
        summary_numbers = dict(export.extra.get("summary", {}))
        run.log_metrics({f"summary/{k}": v for k, v in summary_numbers.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=export.extra["step"])
    exported = []
    if config.export_formats:
        from pipelines.export import export_formats

        exported = export_formats(export_uri, config.export_formats)
    seconds = time.time() - started
    rows = [
        ("run", config.run_name), ("where", where), ("workers", config.num_workers),
        ("steps", export.extra["step"]), ("skipped steps (non-finite)", export.counts.get("skipped_steps", 0)),
        ("samples seen", export.counts.get("samples_seen", 0)),
        ("final loss", f"{summary_numbers.get('final_loss', float('nan')):.4f}"),
        ("samples/s (mean, this attempt)", f"{summary_numbers.get('samples_per_s', 0.0):,.1f}"),
        ("data-wait share", f"{100 * summary_numbers.get('data_wait_share', 0.0):.1f} %"),
        ("resumes (restarts + reruns)", summary_numbers.get("resumes", 0)),
        ("in-training eval failures", _eval_failures_text(summary_numbers)),
        ("metric values dropped (MLflow)", summary_numbers.get("metrics_dropped", 0)),
        ("wall time", f"{seconds:,.0f} s"),
        ("export", export_uri), ("mlflow run", run.run_id or "-"),
        *[(f"exported ({fmt})", out) for fmt, out in zip(config.export_formats, exported)],
    ]
    return TrainResult(run_name=config.run_name, export_uri=export_uri, mlflow_run_id=run.run_id,
                       step=int(export.extra["step"]), summary=summary_table("train", rows),
                       metrics=dict(getattr(result, "metrics", None) or {}))
