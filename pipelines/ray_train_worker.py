"""The skeleton every Ray Train worker of the platform runs (the UNet / upscaler and the autoencoder).

`TrainingWorker` is one attempt of one rank: its config from the driver's dict, the tracking
server in its environment, an Accelerator over Ray's process group, resume from Ray Train's
latest checkpoint, rank 0's reattachment to the driver's MLflow run, checkpoints through
`ray.train.report`, the step loop with its log / checkpoint / eval cadence, and the end. A model
kind subclasses it and supplies only what differs: its trainer (set in its __init__), its step, its evaluation, what
its checkpoint holds beyond the shared state, and its export. `run_worker` is the order of the
phases, the same for every kind.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from latentforge.config import from_dict
from latentforge.tracking import AsyncMetricLogger, StageRun


def say(message: str) -> None:
    """A line on the driver's console, once.

    Ray Train patches `print` in workers to log to the root logger as well as (when stdout is
    wrapped) print; with this worker's logging handler that showed every line twice.
    """
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


def memory_gb(device: Any) -> float:
    """Peak GPU memory on a CUDA device, else the process's resident memory, in GiB."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:  # pragma: no cover
        return 0.0


class Throughput:
    """Step time, data wait and samples: per log window (reset after each progress line) and in total."""

    def __init__(self) -> None:
        self.window = self._empty()
        self.totals = self._empty()

    @staticmethod
    def _empty() -> dict[str, float]:
        return {"time": 0.0, "wait": 0.0, "samples": 0, "steps": 0}

    def add(self, step_time: float, wait: float, samples: int) -> None:
        for bucket in (self.window, self.totals):
            bucket["time"] += step_time
            bucket["wait"] += wait
            bucket["samples"] += samples
            bucket["steps"] += 1

    def new_window(self) -> None:
        self.window = self._empty()

    def mean_rate(self) -> float:
        """Samples per second over the whole attempt."""
        return self.totals["samples"] / self.totals["time"] if self.totals["time"] else 0.0

    def wait_share(self) -> float:
        """The share of the attempt's step time spent waiting for data."""
        return self.totals["wait"] / self.totals["time"] if self.totals["time"] else 0.0


class TrainingWorker:
    """One attempt of one rank; a model kind's worker subclasses it (see the module docstring)."""

    stage = "train"
    """The stage's name: its MLflow run, its console lines."""
    config_cls: type = object
    """The stage's config dataclass (the driver sends it as a dict)."""
    evaluates_in_finish = False
    """True when `export` evaluates the last step itself, so the loop does not evaluate it twice."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        from accelerate import Accelerator

        from latentforge.training.loop import CheckpointPolicy

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        context = ray.train.get_context()
        self.rank, world = context.get_world_rank(), context.get_world_size()
        self.loop_config = loop_config
        self.config: Any = from_dict(self.config_cls, loop_config["config"])
        if loop_config.get("tracking_uri"):
            os.environ["MLFLOW_TRACKING_URI"] = loop_config["tracking_uri"]
        self.accelerator = Accelerator(mixed_precision=self.config.mixed_precision, cpu=not self.config.use_gpu)
        if self.accelerator.num_processes != world:
            raise RuntimeError(f"Accelerate sees {self.accelerator.num_processes} processes, Ray Train started {world}")
        self.policy = CheckpointPolicy(self.config.checkpoint_every, self.config.steps)
        self.mlflow_run_id: str | None = loop_config.get("mlflow_run_id")
        self.resumes = 0
        self.tracking: StageRun | None = None
        self.metrics_logger: AsyncMetricLogger | None = None
        self.trainer: Any = None  # the kind's trainer (`step`, `skipped_steps`, ...): its __init__ sets it

    # -- what a kind supplies ----------------------------------------------------------------------
    def write_checkpoint(self, directory: str, state: dict[str, Any]) -> None:
        """Save the trainer and the kind's own state (beside the shared `state`) into `directory`."""
        raise NotImplementedError

    def read_checkpoint(self, directory: str) -> dict[str, Any]:
        """Load the trainer and the kind's own state from `directory`; returns the shared state."""
        raise NotImplementedError

    def train_step(self) -> Any:
        """One optimizer step (and its metrics); returns its StepResult."""
        raise NotImplementedError

    def log_progress(self, result: Any) -> None:
        """Rank 0's progress line every log_every steps."""
        raise NotImplementedError

    def evaluate(self, step: int) -> Any:
        """Rank 0's evaluation every eval_every steps."""
        raise NotImplementedError

    def export(self, last: Any, steps_done: int, elapsed: float) -> None:
        """Rank 0 at the end: write the export."""
        raise NotImplementedError

    def open_services(self) -> None:
        """Rank 0, after the MLflow run is reattached: what the kind's evaluation needs; nothing by default."""

    def open_data(self) -> None:
        """Before the first step of this attempt: start the data stream; nothing by default."""

    def close_data(self) -> None:
        """After the last step of this attempt (or a failure): stop the data stream; nothing by default."""

    # -- set-up --------------------------------------------------------------------------------------
    def resume(self) -> int | None:
        """Load Ray Train's latest checkpoint, if any; returns the step it resumed from (None: a fresh start)."""
        import ray.train

        from latentforge.training.checkpoint import CheckpointError

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            try:
                state = self.read_checkpoint(directory)
            except CheckpointError as exc:
                raise RuntimeError(f"cannot resume from {checkpoint.path}: {exc}") from exc
        if self.config.mlflow:  # a checkpoint of a tracked run names its MLflow run; --no-mlflow wins
            self.mlflow_run_id = state.get("mlflow_run_id") or self.mlflow_run_id
        self.resumes = int(state.get("resumes", 0)) + 1
        if self.rank == 0:
            say(f"{self.stage}: resumed from {checkpoint.path} at step {self.trainer.step}")
        return self.trainer.step

    def open_tracking(self) -> None:
        """Rank 0 only: reattach the driver's MLflow run (the driver ends it), then the kind's services."""
        if self.rank != 0:
            return
        if self.config.mlflow and self.mlflow_run_id:
            self.tracking = StageRun(self.stage, run_id=self.mlflow_run_id).__enter__()
            self.metrics_logger = AsyncMetricLogger(self.tracking)
        self.open_services()

    # -- the loop ------------------------------------------------------------------------------------
    def train(self) -> Any:
        """Steps until config.steps; returns the last StepResult (None if nothing was left to do)."""
        if self.trainer.step >= self.config.steps:
            return None
        self.open_data()
        last = None
        try:
            while self.trainer.step < self.config.steps:
                last = self.train_step()
                self.after_step(last)
        finally:
            self.close_data()
        return last

    def after_step(self, result: Any) -> None:
        """The cadence: progress line, checkpoint (never right after a skipped step), evaluation."""
        config = self.config
        if self.rank == 0 and (result.step % config.log_every == 0 or result.step == config.steps):
            self.log_progress(result)
        if self.policy.should_save(result.step, result.skipped):
            self.save_checkpoint({"step": result.step, "loss": result.global_loss})
        final = result.step == config.steps
        if self.rank == 0 and config.eval_every > 0 and result.step % config.eval_every == 0 \
                and not (final and self.evaluates_in_finish):
            self.evaluate(result.step)

    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        import ray.train
        from ray.train import Checkpoint

        directory = tempfile.mkdtemp(prefix=f"lf-{self.stage}-ckpt-r{self.rank}-")
        try:
            self.write_checkpoint(directory, {"mlflow_run_id": self.mlflow_run_id, "resumes": self.resumes,
                                              "config": self.loop_config["config"]})
            if self.metrics_logger is not None:  # a restart from here never re-runs (re-logs) the steps before
                self.metrics_logger.flush()
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    # -- the end -------------------------------------------------------------------------------------
    def finish(self, last: Any, steps_done: int, elapsed: float) -> None:
        """Rank 0 writes the export; every rank waits for it."""
        if self.rank == 0:
            self.export(last, steps_done, elapsed)
        self.accelerator.wait_for_everyone()


def run_worker(worker_cls: type[TrainingWorker], loop_config: dict[str, Any]) -> None:
    """The phases of one attempt of one rank, in order: what Ray Train runs on every worker."""
    worker = worker_cls(loop_config)
    worker.resume()
    worker.open_tracking()
    start_step, started = worker.trainer.step, time.perf_counter()
    last = worker.train()
    worker.finish(last, worker.trainer.step - start_step, time.perf_counter() - started)
