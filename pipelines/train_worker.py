"""The Ray Train worker of the train stage: Accelerate + DiffusionTrainer over its own data stream.

`pipelines.train.run` (the driver) hands `train_worker` to `TorchTrainer`; see that module's
docstring for the whole graph and how exact resume works.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from latentforge.config import from_dict
from latentforge.manifest import Manifest
from latentforge.tracking import AsyncMetricLogger, StageRun
from latentforge.training import data as tdata
from latentforge.training.config import TrainConfig

log = logging.getLogger("latentforge.train")


class BatchFeeder:
    """Decodes and collates this rank's samples on a thread, in the deterministic epoch order.

    It stops after `batches` batches: the run's remaining steps. Starting another epoch's Ray Data
    execution that no step will consume is not free: the streaming executor runs in this process
    and its start-up competes with the training thread for the GIL (measured: the last few steps
    of a one-epoch run took 1-4 s each instead of 0.23 s).
    """

    def __init__(self, iterator: Any, plan: tdata.DataPlan, rank: int, epoch: int, skip: int, batch_size: int,
                 dtype: str, min_length: int, batches: int, prefetch: int = 4) -> None:
        self.iterator, self.plan, self.rank = iterator, plan, rank
        self.epoch, self.skip, self.batch_size, self.batches = epoch, skip, batch_size, batches
        self.dtype, self.min_length = dtype, min_length
        self.queue: queue.Queue = queue.Queue(prefetch)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batch-feeder", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        epoch, skip, left = self.epoch, self.skip, self.batches
        try:
            while left > 0 and not self.stop.is_set():
                rows = self.iterator.iter_rows()
                stream = iter(rows)
                try:
                    for _ in range(self.plan.epochs_per_stream(self.rank)):
                        left = self._feed_epoch(stream, epoch, skip, left)
                        epoch, skip = epoch + 1, 0
                        if left <= 0:
                            break
                finally:
                    if hasattr(rows, "close"):
                        rows.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
            self._put(exc)

    def _feed_epoch(self, stream: Any, epoch: int, skip: int, left: int) -> int:
        """Queues up to `left` batches of `epoch`; returns how many are still to come (-1: stopped).

        Unless it stops early, it consumes exactly this epoch's rows of `stream`, so the next
        epoch's rows follow in the same stream.
        """
        epoch_rows = tdata.rank_rows(stream, self.plan, self.rank)
        buffer = []
        for row in tdata.shuffled_epoch(epoch_rows, self.plan, self.rank, epoch, skip):
            buffer.append(tdata.decode_row(row, self.dtype))
            if len(buffer) == self.batch_size:
                if not self._put((epoch, tdata.collate(buffer, self.min_length))):
                    return -1
                buffer, left = [], left - 1
                if left == 0:
                    return 0
        for _ in epoch_rows:  # the tail no step of this epoch uses
            pass
        return left

    def get(self) -> tuple[int, dict[str, Any], float]:
        start = time.perf_counter()
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"data feeder failed: {item}") from item
        epoch, batch = item
        return epoch, batch, time.perf_counter() - start

    def close(self) -> None:
        self.stop.set()


def say(message: str) -> None:
    """A line on the driver's console, once.

    Ray Train patches `print` in workers to log to the root logger as well as (when stdout is
    wrapped) print; with this worker's logging handler that showed every line twice.
    """
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


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
        metrics_logger.log({"data_wait_share": wait_share, "memory_gb": _memory_gb(device),
                            "skipped_steps": trainer.skipped_steps, "epoch": epoch}, step=result.step)


def _weights_digest(model: Any) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _memory_gb(device: Any) -> float:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:  # pragma: no cover
        return 0.0


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
    """The in-training evaluator, or None (no prompts configured, module absent, or it cannot start).

    The import is guarded so training works without the evaluation module; a failure to build the
    evaluator (missing weights, ...) is a loud warning, not a reason to stop a long training run.
    """
    if not config.eval_prompts:
        return None
    try:
        from latentforge.evaluation.in_training import TrainingEvaluator
    except ImportError as exc:
        log.warning("in-training eval is configured but latentforge.evaluation.in_training is unavailable (%s); "
                    "only the validation loss is logged", exc)
        return None
    try:
        return TrainingEvaluator(config.eval_config(), config.data, manifest, device,
                                 scheduler_config=dict(scheduler_config))
    except Exception as exc:  # noqa: BLE001
        log.warning("in-training eval disabled: the evaluator could not start (%s: %s)", type(exc).__name__, exc)
        return None


def evaluate_step(trainer: Any, step: int, val_batches: list[dict[str, Any]], evaluator: Any, run: Any,
                  artifact_pool: Any) -> tuple[dict[str, float], Any]:
    """Rank 0, every eval_every steps: validation loss (raw and EMA) and the in-training eval.

    The evaluator sees the EMA weights; its metrics are returned for logging at `step` in the
    training's MLflow run and its artifacts are uploaded under eval/step_XXXXXX/ on a background
    thread. An eval failure is a warning, never the end of the training.
    """
    metrics: dict[str, float] = {}
    if val_batches:
        metrics["val/loss"] = trainer.validation_loss(val_batches)
        if trainer.ema is not None:
            metrics["val/loss_ema"] = trainer.validation_loss(val_batches, use_ema=True)
    if evaluator is not None:
        out_dir = tempfile.mkdtemp(prefix=f"lf-eval-{step:06d}-")
        try:
            with trainer.ema_weights() as unet:
                evaluation = evaluator.evaluate(unet, step, out_dir)
            metrics.update({k: float(v) for k, v in evaluation.metrics.items()})
            if run is not None and evaluation.artifacts:
                from concurrent.futures import ThreadPoolExecutor

                artifact_pool = artifact_pool or ThreadPoolExecutor(1, thread_name_prefix="mlflow-artifacts")
                for path in evaluation.artifacts:
                    artifact_pool.submit(run.log_artifact, path, f"eval/step_{step:06d}")
        except Exception as exc:  # noqa: BLE001 - an eval failure must not stop training
            log.warning("in-training eval at step %d failed: %s: %s", step, type(exc).__name__, exc)
    return metrics, artifact_pool


def _wait_until_registered(config: TrainConfig, step: int, timeout_s: float = 60.0) -> None:
    """Fault-injection helper: wait until Ray Train has registered the checkpoint of `step`.

    Ray Train collects reports on its health-check poll (every 2 s); a worker that dies inside
    that window loses the newest checkpoint and the run restarts from the one before (still an
    exact resume, only further back). The test wants "killed after a checkpoint", so it waits.
    """
    path = os.path.join(config.storage_path, config.run_name, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(path) as handle:
                latest = json.load(handle).get("latest_checkpoint_result") or {}
            if (latest.get("metrics") or {}).get("step") == step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


def train_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    from accelerate import Accelerator
    from ray.train import Checkpoint

    from latentforge.training.checkpoint import CheckpointError
    from latentforge.training.export import write_export
    from latentforge.training.loop import CheckpointPolicy, DiffusionTrainer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config = from_dict(TrainConfig, loop_config["config"])
    if loop_config.get("tracking_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = loop_config["tracking_uri"]
    manifest = Manifest(**loop_config["manifest"])
    plan = tdata.DataPlan(**loop_config["plan"])
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not config.use_gpu)
    if accelerator.num_processes != world:
        raise RuntimeError(f"Accelerate sees {accelerator.num_processes} processes, Ray Train started {world}")
    empty_text = tdata.read_empty_caption(config.data, manifest)
    trainer = DiffusionTrainer(config, loop_config["unet_config"], accelerator, empty_text,
                               manifest.extra.get("latent", "mean"), rank)
    mlflow_run_id = loop_config.get("mlflow_run_id")
    trace = _Trace(config.trace_dir, rank)
    resumes = 0
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            try:
                state = trainer.load(directory)
            except CheckpointError as exc:
                raise RuntimeError(f"cannot resume from {checkpoint.path}: {exc}") from exc
        tdata.check_same_plan(state["data_plan"], plan)
        mlflow_run_id = state.get("mlflow_run_id") or mlflow_run_id
        resumes = int(state.get("resumes", 0)) + 1
        resumed_from = trainer.step
        if rank == 0:
            say(f"train: resumed from {checkpoint.path} at step {trainer.step}")
    trace.write(event="start", pid=os.getpid(), resumed_from=resumed_from)

    run = metrics_logger = None
    if rank == 0 and mlflow_run_id:
        run = StageRun("train", run_id=mlflow_run_id)
        run.__enter__()  # reattach only; the driver ends the run
        metrics_logger = AsyncMetricLogger(run)
    val_batches: list[dict[str, Any]] = []
    evaluator = None
    if rank == 0 and config.eval_every > 0:
        if plan.val_samples:
            rows = tdata.read_positions(config.data, plan, plan.val_positions())
            samples = [tdata.decode_row(r, manifest.extra.get("dtype", "fp32")) for r in rows]
            val_batches = [tdata.collate(samples[i:i + config.batch_size], empty_text.shape[0])
                           for i in range(0, len(samples), config.batch_size)]
        evaluator = _eval_hook(config, manifest, accelerator.device, trainer.noise_scheduler.config)
    artifact_pool = None

    epoch, position = plan.position_of(trainer.step)
    feeder = None
    if trainer.step < config.steps:
        feeder = BatchFeeder(ray.train.get_dataset_shard(f"train_rank{rank}"), plan, rank, epoch, position,
                             config.batch_size, manifest.extra.get("dtype", "fp32"),
                             empty_text.shape[0] if config.cfg_dropout > 0 else 1,
                             batches=(config.steps - trainer.step) * config.grad_accum)
    fault = loop_config.get("fault")
    window = {"time": 0.0, "wait": 0.0, "samples": 0, "steps": 0}
    totals = {"time": 0.0, "wait": 0.0, "samples": 0}
    policy = CheckpointPolicy(config.checkpoint_every, config.steps)
    last = None
    start_step = trainer.step
    t_start = time.perf_counter()

    def save_checkpoint(metrics: dict[str, Any]) -> None:
        directory = tempfile.mkdtemp(prefix=f"lf-ckpt-r{rank}-")
        try:
            epoch_now, position_now = plan.position_of(trainer.step)
            trainer.save(directory, {
                "epoch": epoch_now, "position": position_now, "data_plan": plan.to_dict(),
                "mlflow_run_id": mlflow_run_id, "resumes": resumes, "config": loop_config["config"],
                "data_dir": config.data, "data_manifest_sha256": loop_config["data_digest"],
            }, write_shared=rank == 0)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    try:
        while trainer.step < config.steps:
            step_start = time.perf_counter()
            micro, wait, keys = [], 0.0, []
            for _ in range(config.grad_accum):
                batch_epoch, batch, waited = feeder.get()
                micro.append(batch)
                keys.extend(batch["keys"])
                wait += waited
            result = trainer.train_step(micro)
            step_time = time.perf_counter() - step_start
            last = result
            samples = config.global_batch
            for bucket in (window, totals):
                bucket["time"] += step_time
                bucket["wait"] += wait
                bucket["samples"] += samples
            window["steps"] += 1
            trace.write(event="step", step=result.step, epoch=batch_epoch, loss=result.loss.hex(),
                        skipped=result.skipped, keys=keys, step_time=step_time, wait=wait, t=time.time())
            if metrics_logger is not None:
                metrics_logger.log({
                    "loss": result.global_loss, "lr": result.lr, "grad_norm": result.grad_norm,
                    "samples_per_s": samples / step_time, "step_time_s": step_time}, step=result.step)
            if rank == 0 and (result.step % config.log_every == 0 or result.step == config.steps):
                report_window(window, result, trainer, config, batch_epoch, metrics_logger, accelerator.device)
                window = {"time": 0.0, "wait": 0.0, "samples": 0, "steps": 0}
            if policy.should_save(result.step, result.skipped):  # never right after a skipped step
                save_checkpoint({"step": result.step, "loss": result.global_loss})
            if rank == 0 and config.eval_every > 0 and result.step % config.eval_every == 0:
                eval_metrics, artifact_pool = evaluate_step(trainer, result.step, val_batches, evaluator, run,
                                                            artifact_pool)
                if eval_metrics:
                    if metrics_logger is not None:
                        metrics_logger.log(eval_metrics, step=result.step)
                    say(f"train: eval at step {result.step}: "
                          + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
            if fault:
                kill_rank, kill_step, marker = fault.split(":", 2)
                if rank == int(kill_rank) and result.step == int(kill_step) and not os.path.exists(marker):
                    open(marker, "w").close()
                    _wait_until_registered(config, (result.step // config.checkpoint_every) * config.checkpoint_every)
                    say(f"train: fault injection: killing worker rank {rank} (pid {os.getpid()}) after step "
                          f"{result.step}")
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        if feeder is not None:
            feeder.close()

    elapsed = time.perf_counter() - t_start
    steps_done = trainer.step - start_step
    summary = {
        "final_loss": last.global_loss if last is not None else float("nan"),
        "samples_per_s": totals["samples"] / totals["time"] if totals["time"] else 0.0,
        "data_wait_share": totals["wait"] / totals["time"] if totals["time"] else 0.0,
        "steps_this_attempt": steps_done, "seconds_this_attempt": elapsed,
        "skipped_steps": trainer.skipped_steps, "resumes": resumes,
        "optimizer": trainer.optimizer_kind,
    }
    if trace.path:
        trace.write(event="final", step=trainer.step, weights_sha256=_weights_digest(trainer.raw_model),
                    ema_sha256=_weights_digest(trainer.export_model()) if trainer.ema is not None else None)
    if rank == 0:
        write_export(
            loop_config["export_uri"], trainer.export_model(), trainer.noise_scheduler, config.data,
            loop_config["data_digest"], manifest, loop_config["config"], trainer.step, mlflow_run_id,
            counts={"steps": trainer.step, "skipped_steps": trainer.skipped_steps,
                    "samples_seen": trainer.samples_seen},
            extra={"summary": summary, "beta_schedule": config.beta_schedule})
        if artifact_pool is not None:
            artifact_pool.shutdown(wait=True)
        if metrics_logger is not None:
            metrics_logger.close()
            if metrics_logger.dropped:
                log.warning("%d metric values were dropped (tracking queue full)", metrics_logger.dropped)
        say(f"train: finished at step {trainer.step} ({trainer.skipped_steps} skipped); export at "
              f"{loop_config['export_uri']}")
    accelerator.wait_for_everyone()
