"""Ingest graph: shard descriptors -> Ray Data (one shard per task) -> manifest updates.

    from_items([{shard, kind, start, end} ...], one block per shard)
      .map(process_shard)            # one Ray task per shard; threads download inside it
      .iter_rows()                   # streamed back to the driver as shards finish
    -> IngestState.record(result)    # manifest.json rewritten atomically per finished shard

The driver only ever holds the small descriptors and per-shard records, so its memory does not
grow with the input; the streaming executor keeps at most the CPUs' worth of shards in flight.
A kill -9 of the driver loses at most the in-flight shards; a rerun redoes exactly those.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from latentforge import reporting
from latentforge.config import config_to_dict
from latentforge.ingest.config import STATUSES, IngestConfig
from latentforge.ingest.inputs import InputPlan, discard_index, input_plan
from latentforge.ingest.shards import process_shard, warm_worker
from latentforge.ingest.state import IngestState, open_state

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run stops after recording what finished."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class IngestResult:
    output: str
    counts: dict[str, int]
    shards_done: int
    rows_done: int
    seconds: float
    manifest_sha256: str
    mlflow_run_id: str | None = None
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.extra.get("ok_this_run", 0) / self.seconds if self.seconds > 0 else 0.0


def _warm(config: dict[str, Any]) -> None:
    # Runs in a Ray worker that the shard tasks then reuse (same job, same runtime env).
    import ray.data  # noqa: F401  (what the map task itself imports)

    warm_worker(IngestConfig(**config))


def _process(row: dict[str, Any], config: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    # Runs in a Ray worker: rebuild the (small) config and plan and do one whole shard.
    result = process_shard(json.loads(row["descriptor"]), IngestConfig(**config), InputPlan.from_dict(plan))
    return {"result": json.dumps(result)}


class _Signals:
    """Turn SIGINT/SIGTERM into `Interrupted` in the driver (only from the main thread)."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.signal(sig, self._handler)
            self.previous.setdefault(sig, old)

    @staticmethod
    def _handler(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            with contextlib.suppress(TypeError, ValueError):  # None: a handler set outside Python
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _signals_raise() -> Iterator[_Signals]:
    signals = _Signals()
    signals.install()
    try:
        yield signals
    finally:
        signals.restore()


@dataclass
class Progress:
    """This run's tally so far; kept when a signal stops the run, so what finished is reported."""

    ok: int = 0
    rows: int = 0
    shards: int = 0


def _todo(config: IngestConfig, state: IngestState) -> tuple[list[dict[str, Any]], int]:
    """The shard descriptors this run does (unfinished base shards, then `--retry` rows) and their row count."""
    descriptors = state.pending_base()
    if config.retry_reasons:
        descriptors += state.retry_descriptors(config.retry_reasons)
    rows_todo = sum((d["end"] - d["start"]) if d["kind"] == "range" else len(d["rows"]) for d in descriptors)
    return descriptors, rows_todo


def _ingest(config: IngestConfig, plan: InputPlan, state: IngestState, descriptors: list[dict[str, Any]],
            rows_todo: int, signals: _Signals, tracker: Any, progress: Progress) -> None:
    """Run the shards on Ray, recording each in the manifest as it finishes and counting it in `progress`."""
    where = _connect(config, len(descriptors))
    signals.install()  # again: ray.init replaces SIGTERM with a handler that aborts
    log.info("ingest: %d shard(s), %d row(s) to do on %s", len(descriptors), rows_todo, where)
    bar = reporting.progress_bar(rows_todo, "ingest", "row", config.progress)
    try:
        for result in _execute(descriptors, config, plan):
            state.record(result)
            rows = result["stats"]["rows"]
            progress.ok += result["samples"]
            progress.rows += rows
            progress.shards += 1
            bar.update(rows)
            bar.set_postfix(ok=progress.ok, shards=f"{progress.shards}/{len(descriptors)}")
            tracker.log_metrics({"rows_done": progress.rows, "ok_done": progress.ok}, step=progress.shards)
    finally:
        bar.close()


def _finish(config: IngestConfig, state: IngestState, progress: Progress, started: float,
            interrupted: Interrupted | None, run_id: str | None) -> IngestResult:
    """The manifest saved, the input index dropped (the next run indexes its input afresh); the result."""
    digest = state.save()
    discard_index(config.output)
    result = IngestResult(output=config.output, counts=state.manifest.counts, shards_done=progress.shards,
                          rows_done=progress.rows, seconds=time.monotonic() - started, manifest_sha256=digest,
                          mlflow_run_id=run_id,
                          extra={"ok_this_run": progress.ok, "dropped": state.dropped,
                                 "complete": state.manifest.extra.get("complete"),
                                 "interrupted": interrupted.signum if interrupted else None})
    result.summary = summary(result, config, state)
    return result


def _log_outputs(tracker: Any, result: IngestResult) -> None:
    metrics = {f"count.{k}": v for k, v in result.counts.items()}
    metrics.update(images_per_s=result.extra["ok_this_run"] / result.seconds if result.seconds else 0.0,
                   rows_this_run=result.rows_done, seconds=result.seconds, success_rate=_rate(result.counts))
    tracker.log_metrics(metrics)
    tracker.log_manifest(result.output, result.manifest_sha256, "output")
    tracker.set_tags({"latentforge.output_uri": result.output})


def run(config: IngestConfig) -> IngestResult:
    """Plan, validate and run the ingest; raises InputError/ManifestError before any download."""
    from latentforge.tracking import StageRun, default_run_name

    config.check_required()
    started = time.monotonic()
    plan = input_plan(config)
    state = open_state(config, plan)
    descriptors, rows_todo = _todo(config, state)
    run_name = config.run_name or default_run_name("ingest", config.output)
    progress = Progress()
    interrupted: Interrupted | None = None
    with StageRun("ingest", run_name=run_name, enabled=config.mlflow) as tracker, _signals_raise() as signals:
        tracker.log_params(config_to_dict(config))
        try:
            if descriptors:
                _ingest(config, plan, state, descriptors, rows_todo, signals, tracker, progress)
        except Interrupted as exc:
            interrupted = exc
        result = _finish(config, state, progress, started, interrupted, getattr(tracker, "run_id", None))
        _log_outputs(tracker, result)
        if interrupted is not None:
            raise interrupted
    return result


def _rate(counts: dict[str, int]) -> float:
    return counts.get("ok", 0) / counts["rows"] if counts.get("rows") else 0.0


def _connect(config: IngestConfig, shards: int) -> str:
    """Ray up, the shard workers warming, Ray Data configured; says where the job runs."""
    from pipelines.runtime import init_ray

    where = init_ray(num_cpus=config.num_cpus, log_to_driver=True)
    _start_warming(config, shards)  # before the driver's own Ray Data import: they overlap
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts rows; Ray's would count shard blocks
    ctx.print_on_execution_start = False
    return where


def _start_warming(config: IngestConfig, shards: int) -> list[Any]:
    """One warm-up task per shard slot free now, so the first shards do not start cold.

    A fresh worker's first shard would spend seconds importing Ray Data, webdataset (torch)
    and the resizer first. These tasks take Ray's prestarted workers and do those imports
    while the driver does its own; holding the shard tasks' CPUs meanwhile, they make the
    shard tasks wait for (and reuse) the warmed processes rather than start new ones. The
    run drops the returned refs: Ray still runs a submitted task, and one that fails logs
    its error (the shard tasks would then fail with the same one).
    """
    import ray

    slots = int(ray.available_resources().get("CPU", 0) // config.cpus_per_task)
    if config.max_concurrent_shards:
        slots = min(slots, config.max_concurrent_shards)
    task = ray.remote(_warm).options(num_cpus=config.cpus_per_task, max_retries=0)
    payload = config_to_dict(config)
    return [task.remote(payload) for _ in range(min(slots, shards))]


def _execute(descriptors: list[dict[str, Any]], config: IngestConfig, plan: InputPlan) -> Iterator[dict[str, Any]]:
    import ray.data

    # Descriptors travel as JSON strings: a range and a retry shard have different fields, and
    # one string column keeps Arrow from inferring (and unifying) a schema for them.
    items = [{"descriptor": json.dumps(d)} for d in descriptors]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(_process, fn_kwargs={"config": config_to_dict(config), "plan": plan.to_dict()},
                num_cpus=config.cpus_per_task, concurrency=config.max_concurrent_shards)
    for row in ds.iter_rows():
        yield json.loads(row["result"])


def summary(result: IngestResult, config: IngestConfig, state: IngestState) -> str:
    counts = result.counts
    rows: list[tuple[str, Any]] = [("input rows", state.plan.total_rows), ("rows done (all runs)", counts.get("rows", 0)),
                                   ("ok", counts.get("ok", 0))]
    rows += [(status, counts[status]) for status in STATUSES[1:] if counts.get(status)]
    if counts.get("retried"):
        rows.append(("retried rows", counts["retried"]))
    rows += [("success rate", f"{100 * _rate(counts):.1f} %"),
             ("this run", f"{result.rows_done:,} rows, {result.shards_done} shards in {result.seconds:,.1f} s"),
             ("images/s (this run)", reporting.format_rate(result.extra.get("ok_this_run", 0), result.seconds, "img")),
             ("shards finished", f"{len([s for s in state.manifest.shards if s.stats.get('kind') != 'retry'])}"
                                 f"/{state.base_shards}" + (f" + {len(state.manifest.extra.get('retry_shards', []))}"
                                                            " retry" if state.manifest.extra.get("retry_shards") else "")),
             ("output", config.output)]
    if result.extra.get("interrupted"):
        rows.append(("stopped by", signal.Signals(result.extra["interrupted"]).name))
    return reporting.summary_table("LatentForge ingest", rows)
