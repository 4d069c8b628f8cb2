"""The Ray Train worker of the train stage: Accelerate + DiffusionTrainer over its own data stream.

`DiffusionWorker` is the UNet's (base or upscaler) part of the shared worker skeleton
(`pipelines.ray_train_worker.TrainingWorker`): its trainer, its data feeder, its step, its
validation / in-training eval and its export. `pipelines.train` (the driver's `UNetKind`) hands
`train_worker` to `TorchTrainer`; see that module's docstring for the whole graph and exact resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

from latentforge.conditioning.spec import ConditionSet
from latentforge.evaluation.in_training import EvalFailures
from latentforge.manifest import Manifest
from latentforge.tracking import AsyncMetricLogger
from latentforge.training import data as tdata
from latentforge.training.config import TrainConfig
from latentforge.training.feeder import BatchFeeder, decode_sample
from latentforge.upscaler.training import upscaler_setup
from pipelines.ray_train_worker import Throughput, TrainingWorker, memory_gb, run_worker, say

log = logging.getLogger("latentforge.train")


def report_window(window: dict[str, float], result: Any, trainer: Any, config: TrainConfig, epoch: int,
                  metrics_logger: AsyncMetricLogger | None, device: Any) -> None:
    """Rank 0's progress line and the per-window metrics (data-wait share, memory, skips, epoch).

    These go to MLflow once per `log_every` window rather than every step: every metric costs the
    worker's GIL time in the tracking client, and a window average is the more useful number.
    """
    rate = window["samples"] / window["time"] if window["time"] else 0.0
    wait_share = window["wait"] / max(window["time"], 1e-9)
    remaining = (config.steps - result.step) * (window["time"] / max(1, window["steps"]))
    say(f"train: step {result.step}/{config.steps} | loss {result.global_loss:.4f} | lr {result.lr:.2e} | "
          f"{rate:,.1f} samples/s | data wait {100 * wait_share:.1f} % | skipped {trainer.skipped_steps} | "
          f"ETA {time.strftime('%H:%M:%S', time.gmtime(remaining))}")
    if metrics_logger is not None:
        metrics_logger.log({"data_wait_share": wait_share, "memory_gb": memory_gb(device),
                            "skipped_steps": trainer.skipped_steps, "epoch": epoch}, step=result.step)


def _weights_digest(model: Any) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Trace:
    """Test/debug trace: one JSON line per event per rank (config.trace_dir)."""

    def __init__(self, trace_dir: str | None, rank: int) -> None:
        self.path = os.path.join(trace_dir, f"trace_rank{rank}.jsonl") if trace_dir else None
        if self.path:
            os.makedirs(trace_dir, exist_ok=True)

    def write(self, **event: Any) -> None:
        if self.path:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(event) + "\n")


def _eval_hook(config: TrainConfig, manifest: Manifest, device: Any, scheduler_config: Any) -> Any:
    """The in-training evaluator, or None when no prompts are configured.

    The driver checked (`check_can_start`) that everything it loads exists; one that still cannot
    start here (out of memory, ...) becomes an `UnavailableEvaluator`, so that every eval it
    misses is a counted failure (metric and summary) rather than a warning at start-up only.
    """
    from latentforge.evaluation.in_training import TrainingEvaluator, UnavailableEvaluator

    if not config.eval_prompts:
        return None
    try:
        return TrainingEvaluator(config.eval_config(), config.data, manifest, device,
                                 scheduler_config=dict(scheduler_config))
    except Exception as exc:  # noqa: BLE001 - counted at every eval step, see UnavailableEvaluator
        return UnavailableEvaluator(f"{type(exc).__name__}: {exc}")


def _upload_then_remove(run: Any, out_dir: str, artifacts: list[str], step: int) -> None:
    try:
        for path in artifacts:
            run.log_artifact(path, f"eval/step_{step:06d}")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def evaluate_step(trainer: Any, step: int, val_batches: list[dict[str, Any]], evaluator: Any, run: Any,
                  artifact_pool: Any, failures: EvalFailures) -> tuple[dict[str, float], Any]:
    """Rank 0, every eval_every steps: validation loss (raw and EMA) and the in-training eval.

    The evaluator sees the EMA weights; its metrics are returned for logging at `step` in the
    training's MLflow run and its artifacts are uploaded under eval/step_XXXXXX/ on a background
    thread, which then removes them. An eval failure never ends the training: it is counted in
    `failures` and in the `eval/failures` metric returned with the others.
    """
    metrics: dict[str, float] = {}
    if val_batches:
        metrics["val/loss"] = trainer.validation_loss(val_batches)
        if trainer.ema is not None:
            metrics["val/loss_ema"] = trainer.validation_loss(val_batches, use_ema=True)
    if evaluator is None:
        return metrics, artifact_pool
    out_dir = tempfile.mkdtemp(prefix=f"lf-eval-{step:06d}-")
    handed_over = False
    try:
        with trainer.ema_weights() as unet:
            evaluation = evaluator.evaluate(unet, step, out_dir)
        metrics.update({k: float(v) for k, v in evaluation.metrics.items()})
        if run is not None and evaluation.artifacts:
            from concurrent.futures import ThreadPoolExecutor

            artifact_pool = artifact_pool or ThreadPoolExecutor(1, thread_name_prefix="mlflow-artifacts")
            artifact_pool.submit(_upload_then_remove, run, out_dir, evaluation.artifacts, step)
            handed_over = True
    except Exception as exc:  # noqa: BLE001 - an eval failure must not stop training
        failures.record(step, exc)
    finally:
        if not handed_over:
            shutil.rmtree(out_dir, ignore_errors=True)
    metrics["eval/failures"] = float(failures.count)
    return metrics, artifact_pool


class DiffusionWorker(TrainingWorker):
    """The UNet's (base or upscaler) part of one attempt of one rank: see the module docstring."""

    stage = "train"
    config_cls = TrainConfig

    def __init__(self, loop_config: dict[str, Any]) -> None:
        from latentforge.training.loop import DiffusionTrainer

        super().__init__(loop_config)
        config = self.config
        self.manifest = Manifest(**loop_config["manifest"])
        self.plan = tdata.DataPlan(**loop_config["plan"])
        self.empty_text = tdata.read_empty_caption(config.data, self.manifest)
        self.trainer = DiffusionTrainer(config, loop_config["unet_config"], self.accelerator, self.empty_text,
                                        self.manifest.extra.get("latent", "mean"), self.rank,
                                        ConditionSet.from_manifest(self.manifest))
        self.upscaler = upscaler_setup(config, self.manifest) if config.stage == "upscaler" else None
        self.trace = _Trace(config.trace_dir, self.rank)
        self.feeder: BatchFeeder | None = None
        self.evaluator = self.artifact_pool = None
        self.eval_failures = EvalFailures()
        self.val_batches: list[dict[str, Any]] = []
        self.throughput = Throughput()
        self.epoch = 0

    @property
    def dtype(self) -> str:
        return self.manifest.extra.get("dtype", "fp32")

    # -- set-up ------------------------------------------------------------------------------------
    def resume(self) -> int | None:
        resumed_from = super().resume()
        self.trace.write(event="start", pid=os.getpid(), resumed_from=resumed_from)
        return resumed_from

    def read_checkpoint(self, directory: str) -> dict[str, Any]:
        state = self.trainer.load(directory)
        tdata.check_same_plan(state["data_plan"], self.plan)
        return state

    def write_checkpoint(self, directory: str, state: dict[str, Any]) -> None:
        epoch, position = self.plan.position_of(self.trainer.step)
        self.trainer.save(directory, {
            "epoch": epoch, "position": position, "data_plan": self.plan.to_dict(), **state,
            "data_dir": self.config.data, "data_manifest_sha256": self.loop_config["data_digest"],
        }, write_shared=self.rank == 0)

    def open_services(self) -> None:
        """Rank 0: load the validation batches, start the evaluator."""
        if self.config.eval_every <= 0:
            return
        if self.plan.val_samples:
            rows = tdata.read_positions(self.config.data, self.plan, self.plan.val_positions())
            transform = self.upscaler.transform if self.upscaler else None
            samples = [decode_sample(r, self.dtype, 0, transform) for r in rows]
            size = self.config.batch_size
            self.val_batches = [tdata.collate(samples[i:i + size], self.empty_text.shape[0])
                                for i in range(0, len(samples), size)]
        self.evaluator = _eval_hook(self.config, self.manifest, self.accelerator.device,
                                    self.trainer.noise_scheduler.config)

    def open_data(self) -> None:
        import ray.train

        config = self.config
        epoch, position = self.plan.position_of(self.trainer.step)
        self.feeder = BatchFeeder(ray.train.get_dataset_shard(f"train_rank{self.rank}"), self.plan, self.rank, epoch,
                                  position, config.batch_size, self.dtype,
                                  self.empty_text.shape[0] if config.cfg_dropout > 0 else 1,
                                  batches=(config.steps - self.trainer.step) * config.grad_accum,
                                  transform=self.upscaler.transform if self.upscaler else None)

    def close_data(self) -> None:
        if self.feeder is not None:
            self.feeder.close()

    # -- the loop ----------------------------------------------------------------------------------
    def train_step(self) -> Any:
        """One optimizer step over grad_accum batches; returns its StepResult (the data epoch in self.epoch)."""
        step_start = time.perf_counter()
        micro, wait, keys = [], 0.0, []
        for _ in range(self.config.grad_accum):
            self.epoch, batch, waited = self.feeder.get()
            micro.append(batch)
            keys.extend(batch["keys"])
            wait += waited
        result = self.trainer.train_step(micro)
        step_time = time.perf_counter() - step_start
        self.throughput.add(step_time, wait, self.config.global_batch)
        self.trace.write(event="step", step=result.step, epoch=self.epoch, loss=result.loss.hex(),
                         skipped=result.skipped, keys=keys, step_time=step_time, wait=wait, t=time.time())
        if self.metrics_logger is not None:
            self.metrics_logger.log({
                "loss": result.global_loss, "lr": result.lr, "grad_norm": result.grad_norm,
                "samples_per_s": self.config.global_batch / step_time, "step_time_s": step_time}, step=result.step)
        return result

    def log_progress(self, result: Any) -> None:
        report_window(self.throughput.window, result, self.trainer, self.config, self.epoch, self.metrics_logger,
                      self.accelerator.device)
        self.throughput.new_window()

    def evaluate(self, step: int) -> None:
        metrics, self.artifact_pool = evaluate_step(self.trainer, step, self.val_batches, self.evaluator,
                                                    self.tracking, self.artifact_pool, self.eval_failures)
        if metrics:
            if self.metrics_logger is not None:
                self.metrics_logger.log(metrics, step=step)
            say(f"train: eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, last: Any, steps_done: int, elapsed: float) -> None:
        """Every rank's final trace (weights digests), then the export on rank 0."""
        trainer = self.trainer
        if self.trace.path:
            self.trace.write(event="final", step=trainer.step, weights_sha256=_weights_digest(trainer.raw_model),
                             ema_sha256=_weights_digest(trainer.export_model()) if trainer.ema is not None else None)
        super().finish(last, steps_done, elapsed)

    def export(self, last: Any, steps_done: int, elapsed: float) -> None:
        """The EMA UNet + manifest, with this attempt's summary; after the tracking flush."""
        from latentforge.training.export_writer import write_export

        trainer, lc = self.trainer, self.loop_config
        summary = {
            "final_loss": last.global_loss if last is not None else float("nan"),
            "samples_per_s": self.throughput.mean_rate(), "data_wait_share": self.throughput.wait_share(),
            "steps_this_attempt": steps_done, "seconds_this_attempt": elapsed,
            "skipped_steps": trainer.skipped_steps, "resumes": self.resumes, "optimizer": trainer.optimizer_kind,
            "eval_failures": self.eval_failures.count, "eval_last_failure": self.eval_failures.last,
            "metrics_dropped": self._flush_tracking(),
        }
        write_export(lc["export_uri"], trainer.export_model(), trainer.noise_scheduler, self.config.data,
                     lc["data_digest"], self.manifest, lc["config"], trainer.step, self.mlflow_run_id,
                     counts={"steps": trainer.step, "skipped_steps": trainer.skipped_steps,
                             "samples_seen": trainer.samples_seen},
                     extra={"summary": summary, "upscaler": self._upscaler_record(),
                            "beta_schedule": self.config.beta_schedule,
                            "conditions": trainer.conditions.records()})
        say(f"train: finished at step {trainer.step} ({trainer.skipped_steps} skipped); export at {lc['export_uri']}")

    def _upscaler_record(self) -> dict[str, Any] | None:
        """The export's `extra.upscaler` (in-channels, noise-level range, scaling factor, ...); None for a base."""
        return self.upscaler.record(self.manifest) if self.upscaler is not None else None

    def _flush_tracking(self) -> int:
        """Wait for the eval uploads and the queued metrics; returns the metric values MLflow never took."""
        if self.artifact_pool is not None:
            self.artifact_pool.shutdown(wait=True)
        if self.metrics_logger is None:
            return 0
        self.metrics_logger.close()
        if self.metrics_logger.dropped:
            log.warning("%d metric values never reached MLflow (an outage or a full queue; see the warnings above)",
                        self.metrics_logger.dropped)
        return self.metrics_logger.dropped


def train_worker(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker."""
    run_worker(DiffusionWorker, loop_config)
