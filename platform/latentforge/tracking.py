"""MLflow tracking for every stage: one run per stage invocation, lineage through manifests.

Defaults: `MLFLOW_TRACKING_URI` when set (the team's server), otherwise a local sqlite store
under `./mlruns` that `mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` opens. A
tracking outage must never stop a stage: every call goes through `_safe`, which warns once
per failure kind and carries on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

LOCAL_STORE_DIR = "mlruns"
PIPELINE_RUN_ENV = "LATENTFORGE_PIPELINE_RUN_ID"
EXPERIMENT_ENV = "LATENTFORGE_EXPERIMENT"
DEFAULT_EXPERIMENT = "latentforge"


def tracking_uri() -> str:
    """The server from MLFLOW_TRACKING_URI, else the local sqlite store (created on demand)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(LOCAL_STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _local_artifact_root(uri: str) -> str | None:
    # A sqlite store without a server would put artifacts in ./mlartifacts of whatever cwd the
    # job had; pin them beside the database instead so `mlflow ui` finds them.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"} with values cut to MLflow's 6000-char param limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def _safe(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - tracking must never stop the stage
        log.warning("MLflow %s failed (%s: %s); continuing without it", what, type(exc).__name__, exc)
        return None


class StageRun:
    """One MLflow run for one stage invocation; a context manager.

    `run_id` resumes an existing run (training restarts continue the same run). When the
    environment names a pipeline run (the demo sets it), this run becomes its child so the
    stage runs of one invocation are grouped in the UI.
    """

    def __init__(self, stage: str, run_name: str | None = None, run_id: str | None = None,
                 experiment: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        self.stage = stage
        self.run_name = run_name
        self.run_id = run_id
        self.experiment = experiment or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
        self.tags = {"latentforge.stage": stage, **(tags or {})}
        self.client: Any = None

    def __enter__(self) -> "StageRun":
        _safe("start", self._start)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        status = "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        if self.client is not None and self.run_id is not None:
            _safe("end", self.client.set_terminated, self.run_id, status)

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        uri = tracking_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(self.experiment, artifact_location=_local_artifact_root(uri)))
        parent = os.environ.get(PIPELINE_RUN_ENV)
        tags = {**self.tags, **({"mlflow.parentRunId": parent} if parent else {})}
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.active:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in flatten(params).items()]
            for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                _safe("log_params", self.client.log_batch, self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.active:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
            _safe("log_metrics", self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            for key, value in tags.items():
                _safe("set_tag", self.client.set_tag, self.run_id, key, str(value))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.active:
            _safe("log_artifact", self.client.log_artifact, self.run_id, local_path, artifact_path)

    def log_manifest(self, dir_uri: str, digest: str, context: str, name: str | None = None) -> None:
        """Record a stage's input ("input") or output ("output") manifest as an MLflow dataset."""
        if self.active:
            _safe("log_input", self._log_dataset, dir_uri, digest, context, name)

    def _log_dataset(self, dir_uri: str, digest: str, context: str, name: str | None) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name or dir_uri.rstrip("/").rsplit("/", 1)[-1], digest=digest[:36],
                          source_type="local" if "://" not in dir_uri else dir_uri.split("://")[0],
                          source=f'{{"uri": "{dir_uri}/manifest.json"}}')
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=[tag])])


class AsyncMetricLogger:
    """Batches metrics on a background thread so a training step never waits for MLflow.

    A synchronous `log_metric` to a server costs ~100 ms; here `log` only enqueues, and the
    thread flushes every `interval_s`. If the server is down the batch is dropped with a
    warning (and counted in `dropped`) rather than growing without bound.
    """

    def __init__(self, run: StageRun, interval_s: float = 2.0, max_queue: int = 100_000) -> None:
        self.run = run
        self.interval_s = interval_s
        self.dropped = 0
        self._queue: queue.Queue[tuple[dict[str, float], int]] = queue.Queue(max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        try:
            self._queue.put_nowait((dict(metrics), step))
        except queue.Full:
            self.dropped += len(metrics)

    def _drain(self) -> None:
        from mlflow.entities import Metric

        items: list[Any] = []
        while not self._queue.empty() and len(items) < 900:  # MLflow caps a batch at 1000 metrics
            metrics, step = self._queue.get_nowait()
            now = int(time.time() * 1000)
            items.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if items and self.run.active:
            _safe("log_batch", self.run.client.log_batch, self.run.run_id, metrics=items)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._drain()

    def close(self) -> None:
        """Flush what is queued and stop the thread."""
        self._stop.set()
        self._thread.join(timeout=30)
        while not self._queue.empty():
            self._drain()
