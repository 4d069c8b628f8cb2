"""The driver every training stage runs (the UNet / upscaler and the autoencoder), as named steps.

    run_training(kind):
        plan            the kind reads and checks its data, before Ray starts (a usage error is exit 2)
        storage         the storage path made absolute; Ray started; node-local storage refused on a
                        multi-machine cluster (and a storage "shared" that some node does not see);
                        a local sqlite MLflow store on such a cluster warned about
        resume          the run state of an earlier run of the same name, checked against this one
        track           the run's single MLflow run opened (or reopened); on a fresh run the run state,
                        the params and the input manifest recorded
        fit             TorchTrainer over the kind's worker, its process group on each node's Ray
                        address (not loopback); a training failure is a RuntimeError
        lineage         the export's manifest logged as the run's output, its summary numbers as metrics
        summary         the kind's after-export hook, then the summary table

A `TrainingKind` supplies only what differs: its stage name, config, data plan, worker, datasets,
resume check and summary rows.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from latentforge.config import ConfigError, config_to_dict
from latentforge.manifest import Manifest, ManifestError, manifest_digest, read_manifest
from latentforge.reporting import summary_table
from latentforge.tracking import StageRun, default_run_name, tracking_uri
from latentforge.training import run_storage

log = logging.getLogger("latentforge.train")


@dataclass
class TrainResult:
    run_name: str
    export_uri: str
    mlflow_run_id: str | None
    step: int
    summary: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingPlan:
    """What a kind decided before any worker starts."""

    data_digest: str
    """sha256 of the data's manifest: the run state and the export name it, a resume must match it."""
    loop_config: dict[str, Any]
    """The kind's part of what every worker receives (the driver adds config, run id, export location)."""
    derived: dict[str, Any] = field(default_factory=dict)
    """Derived numbers logged with the params of a fresh run."""
    run_state: dict[str, Any] = field(default_factory=dict)
    """The kind's part of the run state a rerun is checked against."""


class TrainingKind:
    """What one model kind supplies to `run_training`; see the module docstring."""

    stage = "train"
    """Stage name: the MLflow run's, the default run name's prefix, the export manifest's stage."""
    worker: Callable[[dict[str, Any]], None]
    """The function Ray Train runs on every worker."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def plan(self) -> TrainingPlan:
        """Read and check the data (and the model against it), before Ray starts."""
        raise NotImplementedError

    def datasets(self, plan: TrainingPlan) -> dict[str, Any] | None:
        """Ray Data streams handed to the workers; None: the workers read their data themselves."""
        return None

    def check_resume(self, previous: dict[str, Any], plan: TrainingPlan) -> None:
        """Refuse a rerun that cannot continue the earlier run (beyond the same data); nothing by default."""

    def summary_rows(self, export: Manifest) -> list[tuple[str, Any]]:
        """The kind's rows of the summary table, between the shared head and tail."""
        return []

    def after_export(self, export_uri: str) -> list[tuple[str, Any]]:
        """After the run is closed: further work on the export; returns its summary rows."""
        return []

    def result_metrics(self, export: Manifest, fit_result: Any) -> dict[str, Any]:
        """The numbers `TrainResult.metrics` carries: Ray Train's last reported metrics by default."""
        return dict(getattr(fit_result, "metrics", None) or {})


def read_data_manifest(data: str, stage: str) -> tuple[str, Manifest]:
    """`--data` made absolute (a local path means the same on every node) and its `stage` manifest;
    a missing flag or a wrong / unreadable manifest is a ConfigError (exit 2)."""
    if not data:
        raise ConfigError(f"--data is required (the {stage} stage's output directory or URI)")
    data = data if "://" in data else os.path.abspath(data)
    try:
        return data, read_manifest(data, stage=stage)
    except ManifestError as exc:
        raise ConfigError(str(exc)) from exc


def run_training(kind: TrainingKind) -> TrainResult:
    """The steps of the module docstring, in order."""
    from pipelines.runtime import init_ray

    config = kind.config
    plan = kind.plan()
    config.run_name = config.run_name or default_run_name(kind.stage)
    config.storage_path = absolute_storage(config.storage_path)
    where = init_ray(trains=True)
    check_cluster_storage(config)
    previous = read_previous_run(kind, plan)
    export_uri = run_storage.export_dir(config.storage_path, config.run_name)
    started = time.time()
    with StageRun(kind.stage, run_name=config.run_name, run_id=(previous or {}).get("mlflow_run_id"),
                  enabled=config.mlflow) as run:
        if previous is None:
            record_fresh_run(kind, plan, run)
        fit_result = fit(kind, plan, worker_config(kind, plan, run.run_id, export_uri))
        export = record_lineage(kind, run, export_uri)
    rows = kind.after_export(export_uri)
    summary = summary_table(kind.stage, [*_head_rows(config, where, export), *kind.summary_rows(export),
                                         ("wall time", f"{time.time() - started:,.0f} s"), ("export", export_uri),
                                         ("mlflow run", run.run_id or "-"), *rows])
    return TrainResult(run_name=config.run_name, export_uri=export_uri, mlflow_run_id=run.run_id,
                       step=int(export.extra["step"]), summary=summary, metrics=kind.result_metrics(export, fit_result))


def absolute_storage(path: str) -> str:
    """A local storage path made absolute (the workers' cwd is not the driver's); a URI unchanged."""
    if run_storage.is_local_path(path):
        return os.path.abspath(path[len("file://"):] if path.startswith("file://") else path)
    return path


def _worker_nodes() -> list[dict[str, Any]]:
    """Alive Ray nodes that can host a training worker (a CPU or a GPU)."""
    import ray

    return [n for n in ray.nodes()
            if n.get("Alive") and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]


def node_addresses() -> list[str]:
    return [n["NodeManagerAddress"] for n in _worker_nodes()]


def _storage_view(path: str, marker: str) -> str:
    """On a node: a key of run_storage.STORAGE_VIEWS for what it sees at the driver's storage path.

    Only ever called for a node-local path (`run_storage.is_local_path`: object storage needs no such
    check), so the local filesystem calls here are the point: what this node's own disk holds there.
    """
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


def check_cluster_storage(config: Any) -> None:
    """Refuse storage some worker node cannot reach; warn about a local sqlite store on several machines."""
    import ray

    nodes = node_addresses()
    run_storage.check_storage(config.storage_path, nodes, config.storage_is_shared)
    several = len(set(nodes)) > 1
    if config.storage_is_shared and run_storage.is_local_path(config.storage_path) and several:
        run_storage.check_storage_seen(config.storage_path, _storage_views(config.storage_path),
                                       ray.util.get_node_ip_address())
    if config.mlflow and several and tracking_uri().startswith("sqlite:"):
        log.warning("MLflow logs to a local sqlite file (%s) but the cluster spans several machines: rank 0 may "
                    "run elsewhere and log to its own file. Set MLFLOW_TRACKING_URI to a tracking server.",
                    tracking_uri())


def read_previous_run(kind: TrainingKind, plan: TrainingPlan) -> dict[str, Any] | None:
    """The run state of an earlier run of this name (None: a fresh run), checked against this run."""
    config = kind.config
    previous = run_storage.read_run_state(config.storage_path, config.run_name)
    if previous is not None:
        run_storage.check_resume(previous, config.data, plan.data_digest, config.run_name)
        kind.check_resume(previous, plan)
        print(f"{kind.stage}: run {config.run_name!r} exists; resuming from its latest checkpoint", flush=True)
    return previous


def record_fresh_run(kind: TrainingKind, plan: TrainingPlan, run: StageRun) -> None:
    """A fresh run's state (what a rerun is checked against), params and input manifest."""
    config = kind.config
    run_storage.write_run_state(config.storage_path, config.run_name, {
        "mlflow_run_id": run.run_id, "data_dir": config.data, "data_manifest_sha256": plan.data_digest,
        **plan.run_state, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    run.log_params({**config_to_dict(config), "derived": {"global_batch": config.global_batch, **plan.derived}})
    run.log_manifest(config.data, plan.data_digest, "input")


def worker_config(kind: TrainingKind, plan: TrainingPlan, run_id: str | None, export_uri: str) -> dict[str, Any]:
    """What every worker receives: the resolved config, the kind's plan, the MLflow run, the export location."""
    config = kind.config
    return {"config": config_to_dict(config), **plan.loop_config, "data_digest": plan.data_digest,
            "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri() if config.mlflow else None,  # tracking_uri() makes ./mlruns
            "export_uri": export_uri}


def fit(kind: TrainingKind, plan: TrainingPlan, loop_config: dict[str, Any]) -> Any:
    """TorchTrainer.fit() over the kind's worker; a training failure becomes a RuntimeError."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.process_group import NodeInterfaceTorchConfig

    config = kind.config
    trainer = TorchTrainer(
        kind.worker, train_loop_config=loop_config,
        torch_config=NodeInterfaceTorchConfig(),  # gloo/NCCL on each node's Ray address, not loopback
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker},
                                     placement_strategy=config.placement_strategy),
        run_config=RunConfig(name=config.run_name, storage_path=config.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=config.max_failures)),
        **_dataset_options(kind.datasets(plan)))
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RuntimeError(f"training failed after {config.max_failures} restart(s): {exc}") from exc


def _dataset_options(datasets: dict[str, Any] | None) -> dict[str, Any]:
    """TorchTrainer's dataset arguments: each rank reads its own named stream whole and in file order."""
    if datasets is None:
        return {}
    from ray.train import DataConfig

    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the per-rank order must be the file order (exact resume)
    ingest.verbose_progress = False
    return {"datasets": datasets, "dataset_config": DataConfig(datasets_to_split=[], execution_options=ingest)}


def record_lineage(kind: TrainingKind, run: StageRun, export_uri: str) -> Manifest:
    """The export as the run's output (tag + manifest) and its summary numbers as metrics; returns its manifest."""
    export = read_manifest(export_uri, stage=kind.stage)
    run.set_tags({"latentforge.export_uri": export_uri})
    run.log_manifest(export_uri, manifest_digest(export_uri), "output", name=f"{kind.config.run_name}-export")
    numbers = export.extra.get("summary", {})
    run.log_metrics({f"summary/{k}": v for k, v in numbers.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=export.extra["step"])
    return export


def _head_rows(config: Any, where: str, export: Manifest) -> list[tuple[str, Any]]:
    return [("run", config.run_name), ("where", where), ("workers", config.num_workers),
            ("steps", export.extra["step"]), ("skipped steps (non-finite)", export.counts.get("skipped_steps", 0))]
