"""MLflow tracking for every stage: one run per stage invocation, lineage through manifests.

Defaults: `MLFLOW_TRACKING_URI` when set (the team's server), otherwise a local sqlite store
under `./mlruns` that `mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` opens. A
tracking outage must never stop a stage: every call goes through `_safe`, which warns and
carries on; metrics logged in the background count what an outage drops. A stage config that
inherits `TrackingOptions` gets `--no-mlflow`, with which the stage makes no MLflow call at all.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from latentforge.config import ConfigError, StageConfig
from latentforge.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

LOCAL_STORE_DIR = "mlruns"
PIPELINE_RUN_ENV = "LATENTFORGE_PIPELINE_RUN_ID"
EXPERIMENT_ENV = "LATENTFORGE_EXPERIMENT"
DEFAULT_EXPERIMENT = "latentforge"


@dataclass
class TrackingOptions(StageConfig):
    """Base of every stage config: whether the stage tracks itself in MLflow."""

    mlflow: bool = True
    """Track this stage in MLflow (MLFLOW_TRACKING_URI, else ./mlruns); --no-mlflow: no MLflow call at all."""


def default_run_name(stage: str, location: str | None = None) -> str:
    """The run name a stage gets when the user gives none: `<stage>-<last part of its output location>`,
    or `<stage>-<UTC time>` for a stage without one (a training run, whose directory is named after it)."""
    tail = (location or "").rstrip("/").rsplit("/", 1)[-1]
    return f"{stage}-{tail or time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def tracking_uri() -> str:
    """The server from MLFLOW_TRACKING_URI, else the local sqlite store (created on demand)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(LOCAL_STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def check_store_outlives_job() -> None:
    """Refuse the local default store when this process runs in Ray's copy of a submitted working dir.

    `ray job submit --working-dir .` runs the job in /tmp/ray/session_*/runtime_resources/
    working_dir_files/...: a ./mlruns there is not the one `make mlflow` serves, and it is
    deleted with the cluster's session.
    """
    parts = Path.cwd().parts
    if not os.environ.get("MLFLOW_TRACKING_URI") and "runtime_resources" in parts and "working_dir_files" in parts:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI is not set and this job runs in Ray's temporary copy of its working dir "
            f"({Path.cwd()}), where ./mlruns would be lost: start `make mlflow` and submit with "
            "infra/submit.sh (it forwards your MLFLOW_TRACKING_URI) or --runtime-env-json "
            "'{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://127.0.0.1:5000\"}}', or pass --no-mlflow")


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
                 experiment: str | None = None, tags: Mapping[str, str] | None = None,
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.stage = stage
        self.run_name = run_name
        self.run_id = run_id if enabled else None  # a disabled run names no run, even on resume
        self.experiment = experiment or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
        self.tags = {"latentforge.stage": stage, **(tags or {})}
        self.client: Any = None

    def __enter__(self) -> "StageRun":
        # Disabled (a job's `--no-mlflow`): every method below is then a no-op, as in an outage.
        if self.enabled:
            check_store_outlives_job()  # a usage error, not an outage: it must stop the stage
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
        parent = os.environ.get(PIPELINE_RUN_ENV)
        experiment_id = None
        if parent:
            # Children must live in the parent's experiment, or the UI cannot nest them under it.
            experiment_id = _safe("get parent run", lambda: self.client.get_run(parent).info.experiment_id)
            if experiment_id is None:
                parent = None
        if experiment_id is None:
            experiment_id = ensure_experiment(self.client, self.experiment, uri)
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
        """Record a stage's input ("input") or output ("output") manifest as an MLflow dataset.

        The dataset's digest is the manifest's sha256 (cut to MLflow's 36 characters) and its
        source the manifest's URI, so the run that wrote a directory and every run that read it
        share one digest: `upstream_runs` follows that link, and the UI lists it under
        "Datasets used" with its context. The same facts go into `latentforge.<context>.*` tags.
        """
        if self.active:
            _safe("log_input", self._log_dataset, dir_uri, digest, context, name)

    def _log_dataset(self, dir_uri: str, digest: str, context: str, name: str | None) -> None:
        from mlflow.entities import DatasetInput, InputTag

        dataset = manifest_dataset(dir_uri, digest, name)
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=[tag])])
        self.set_tags({f"latentforge.{context}.manifest": manifest_uri_of(dir_uri),
                       f"latentforge.{context}.digest": digest})


def manifest_uri_of(dir_uri: str) -> str:
    """The manifest's URI, absolute for local paths so the UI's source is unambiguous."""
    base = dir_uri.rstrip("/")
    if "://" not in base:
        base = str(Path(base).resolve())
    return f"{base}/{MANIFEST_NAME}"


def manifest_dataset(dir_uri: str, digest: str, name: str | None = None) -> Any:
    """An `mlflow.entities.Dataset` for a stage directory: digest, source and a small profile."""
    import json

    from mlflow.entities import Dataset

    uri = manifest_uri_of(dir_uri)
    source_type = uri.split("://", 1)[0] if "://" in uri else "local"
    profile: dict[str, Any] = {}
    try:
        from latentforge.manifest import read_manifest

        manifest = read_manifest(dir_uri)
        profile = {"stage": manifest.stage, "shards": len(manifest.shards), "samples": manifest.total_samples,
                   "schema_version": manifest.schema_version}
    except Exception:  # noqa: BLE001 - the profile is a courtesy; the digest is the identity
        pass
    return Dataset(name=name or dir_uri.rstrip("/").rsplit("/", 1)[-1], digest=digest[:36],
                   source_type=source_type, source=json.dumps({"uri": uri}),
                   profile=json.dumps(profile) if profile else None)


def ensure_experiment(client: Any, name: str, uri: str | None = None) -> str:
    """The id of experiment `name`, created (with artifacts beside a local sqlite store) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_local_artifact_root(uri or tracking_uri()))
    except Exception:  # a concurrent stage created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class PipelineRun:
    """The parent MLflow run of one pipeline invocation (the demo's): a context manager.

    While it is open, LATENTFORGE_PIPELINE_RUN_ID names it, so every `StageRun` started in
    this process or its children (Ray workers inherit the driver's environment through
    `runtime_env`) becomes its child run and the UI shows the stages nested under it.
    """

    def __init__(self, name: str, experiment: str | None = None, tags: Mapping[str, str] | None = None,
                 enabled: bool = True) -> None:
        self.stage_run = StageRun("pipeline", run_name=name, experiment=experiment,
                                  tags={"latentforge.pipeline": name, **(tags or {})}, enabled=enabled)
        self._previous: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.stage_run.run_id

    def __enter__(self) -> "PipelineRun":
        self._previous = os.environ.pop(PIPELINE_RUN_ENV, None)  # a pipeline is never a child
        self.stage_run.__enter__()
        if self.stage_run.run_id:
            os.environ[PIPELINE_RUN_ENV] = self.stage_run.run_id
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        os.environ.pop(PIPELINE_RUN_ENV, None)
        if self._previous is not None:
            os.environ[PIPELINE_RUN_ENV] = self._previous
        self.stage_run.__exit__(exc_type, exc, tb)


def log_metrics_to_run(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Add metrics to an existing (e.g. finished) run, such as a training run's post-hoc evaluation."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    _safe("log_metrics", lambda: MlflowClient(tracking_uri=tracking_uri()).log_batch(run_id, metrics=items))


def log_artifact_to_run(run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    """Add a file to an existing run's artifacts (e.g. samples made after training finished)."""
    from mlflow.tracking import MlflowClient

    _safe("log_artifact",
          lambda: MlflowClient(tracking_uri=tracking_uri()).log_artifact(run_id, local_path, artifact_path))


def upstream_runs(run_id: str, client: Any = None) -> list[dict[str, str]]:
    """Lineage: for each input dataset of `run_id`, the run(s) that logged it as their output.

    Returns [{"input": dataset name, "digest": ..., "run_id": ..., "stage": ...}], following
    the digests only one step back; call it again on a returned run id to go further.
    """
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient(tracking_uri=tracking_uri())
    run = client.get_run(run_id)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    out: list[dict[str, str]] = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), None)
        if context != "input":
            continue
        digest = item.dataset.digest
        found = client.search_runs(experiment_ids,
                                   filter_string=f"dataset.digest = '{digest}' AND dataset.context = 'output'")
        for producer in found:
            if producer.info.run_id != run_id:
                out.append({"input": item.dataset.name, "digest": digest, "run_id": producer.info.run_id,
                            "stage": producer.data.tags.get("latentforge.stage", "")})
    return out


class AsyncMetricLogger:
    """Batches metrics on a background thread so a training step never waits for MLflow.

    A synchronous `log_metric` to a server costs ~100 ms; here `log` only enqueues, and the
    thread flushes every `interval_s`. A batch the server does not take (an outage, after the
    client's own retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES) is dropped, not re-queued, so the
    memory stays bounded: its values count in `dropped`, and a warning says so when the outage
    starts and again when the server answers. A full queue drops (and counts) the same way.
    """

    def __init__(self, run: StageRun, interval_s: float = 2.0, max_queue: int = 100_000) -> None:
        self.run = run
        self.interval_s = interval_s
        self.dropped = 0
        self._in_outage = False
        self._abandoned = False
        self._in_flight = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[dict[str, float], int]] = queue.Queue(max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        try:
            self._queue.put_nowait((dict(metrics), step))
        except queue.Full:
            self._count_dropped(len(metrics))

    def _count_dropped(self, values: int) -> None:
        with self._lock:
            if not self._abandoned:
                self.dropped += values

    def _pop(self, max_values: float) -> list[tuple[dict[str, float], int]]:
        popped: list[tuple[dict[str, float], int]] = []
        values = 0
        while values < max_values:
            try:
                popped.append(self._queue.get_nowait())
            except queue.Empty:
                break
            values += len(popped[-1][0])
        return popped

    def _drain(self) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step)
                 for metrics, step in self._pop(900) for k, v in metrics.items()]  # MLflow: <= 1000 per batch
        if not items:
            return
        self._in_flight = len(items)
        try:
            self._send(items)
        finally:
            self._in_flight = 0

    def _send(self, items: list[Any]) -> None:
        try:
            if not self.run.active:
                raise RuntimeError("the run could not be started or reattached")
            self.run.client.log_batch(self.run.run_id, metrics=items)
        except Exception as exc:  # noqa: BLE001 - an outage must never stop the stage
            self._count_dropped(len(items))
            if not self._in_outage:
                log.warning("MLflow did not take %d metric values (%s: %s); dropping metric batches until it "
                            "answers again", len(items), type(exc).__name__, exc)
            self._in_outage = True
            return
        if self._in_outage:
            log.warning("MLflow answers again; %d metric values were dropped so far", self.dropped)
        self._in_outage = False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._drain()
        while not self._queue.empty():  # the final flush, here so that close() can bound its wait
            self._drain()

    def flush(self) -> None:
        """Send what is queued, from the caller's thread; skipped during an outage (no waiting on retries)."""
        while not self._in_outage and not self._queue.empty():
            self._drain()

    def close(self, timeout_s: float = 60.0) -> None:
        """Flush what is queued and stop the thread; after `timeout_s` what is left counts as dropped."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        if not self._thread.is_alive():
            return
        with self._lock:  # still inside an unreachable server's retries: give up on the rest
            left = self._in_flight + sum(len(metrics) for metrics, _ in self._pop(float("inf")))
            self.dropped += left
            self._abandoned = True
        log.warning("MLflow: %d metric values still unsent after %.0f s are dropped", left, timeout_s)
