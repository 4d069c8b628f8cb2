"""The autoencoder stage as a Ray Train graph: ingest shards --> TorchTrainer workers running Accelerate.

    driver: read the ingest manifest, check the init model, deal shards to ranks, pick the
            held-out images, refuse node-local storage on a multi-machine cluster, open (or
            reopen) the run's single MLflow run, then TorchTrainer.fit()
    worker: Accelerator (DDP over Ray's process group) + AutoencoderTrainer over its own
            `ImageStream` (its shards, precompute's preprocessing, a seeded resumable order);
            checkpoints through `ray.train.report(checkpoint=...)`; rank 0 logs the loss terms,
            PSNR / SSIM and a reconstruction grid of the held-out images to MLflow, measures the
            latent scaling factor and writes the export.

Resume: a checkpoint holds the weights, optimizer, LR schedule, counters, each rank's posterior
generator and its stream position; Ray Train restores the latest one after a worker failure
(FailureConfig) and when the same run name is rerun, as in the train stage.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from latentforge.autoencoder import data as aedata
from latentforge.autoencoder.config import AutoencoderTrainConfig
from latentforge.config import ConfigError, config_to_dict, from_dict
from latentforge.manifest import manifest_digest, read_manifest
from latentforge.reporting import summary_table
from latentforge.tracking import AsyncMetricLogger, StageRun, default_run_name, tracking_uri
from latentforge.training import run_storage
from pipelines.train import _absolute_storage, _node_addresses, read_data_manifest
from pipelines.train_worker import say

log = logging.getLogger("latentforge.autoencoder")
STAGE = "autoencoder"


@dataclass
class AutoencoderResult:
    run_name: str
    export_uri: str
    mlflow_run_id: str | None
    step: int
    metrics: dict[str, float]
    summary: str


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def check_init(config: AutoencoderTrainConfig) -> dict[str, Any] | None:
    """The fine-tune start's config (None from scratch), checked before any worker starts."""
    if not config.init:
        return None
    from diffusers import AutoencoderKL

    if not os.path.isfile(os.path.join(config.init, "config.json")):
        raise ConfigError(f"--init {config.init!r}: not a local diffusers AutoencoderKL directory (no config.json)")
    model_config = dict(AutoencoderKL.load_config(config.init))
    if model_config.get("_class_name") not in (None, "AutoencoderKL"):
        raise ConfigError(f"--init {config.init!r} holds a {model_config['_class_name']}, not an AutoencoderKL")
    downsample = 2 ** (len(model_config["block_out_channels"]) - 1)
    if config.resolution % downsample:
        raise ConfigError(f"resolution {config.resolution} is not divisible by the init model's downsampling "
                          f"factor {downsample}")
    return model_config


def plan(config: AutoencoderTrainConfig) -> dict[str, Any]:
    """Everything the workers need that is decided once: shards per rank, held-out images, digests."""
    config.data, manifest = read_data_manifest(config.data, "ingest")
    init_config = check_init(config)
    rank_shards = aedata.deal_shards(manifest, config.num_workers)
    val_keys, val_images = aedata.held_out(config.data, manifest, config.val_samples, config.resolution,
                                           config.resize_filter)
    if config.val_samples and not val_keys:
        raise ConfigError(f"{config.data}: no decodable image to hold out for PSNR / SSIM")
    return {"manifest": manifest, "digest": manifest_digest(config.data), "rank_shards": rank_shards,
            "val_keys": val_keys, "val_images": val_images, "init_config": init_config}


def _check_previous(config: AutoencoderTrainConfig, digest: str) -> dict[str, Any] | None:
    previous = run_storage.read_run_state(config.storage_path, config.run_name)
    if previous is not None:
        run_storage.check_resume(previous, config.data, digest, config.run_name)
        if previous.get("num_workers", config.num_workers) != config.num_workers:
            raise ConfigError(f"cannot resume run {config.run_name!r} with {config.num_workers} workers: it was "
                              f"started with {previous['num_workers']} (each rank's data position is its own)")
        print(f"{STAGE}: run {config.run_name!r} exists; resuming from its latest checkpoint", flush=True)
    return previous


def run(config: AutoencoderTrainConfig) -> AutoencoderResult:
    from pipelines.runtime import init_ray

    work = plan(config)
    config.run_name = config.run_name or default_run_name("autoencoder")
    config.storage_path = _absolute_storage(config.storage_path)
    where = init_ray(trains=True)
    run_storage.check_storage(config.storage_path, _node_addresses(), config.storage_is_shared)
    previous = _check_previous(config, work["digest"])
    resolved = config_to_dict(config)
    export_uri = run_storage.export_dir(config.storage_path, config.run_name)
    started = time.time()
    with StageRun(STAGE, run_name=config.run_name, run_id=(previous or {}).get("mlflow_run_id"),
                  enabled=config.mlflow) as tracking:
        if previous is None:
            run_storage.write_run_state(config.storage_path, config.run_name, {
                "mlflow_run_id": tracking.run_id, "data_dir": config.data, "num_workers": config.num_workers,
                "data_manifest_sha256": work["digest"], "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            tracking.log_params({**resolved, "derived": {"global_batch": config.global_batch,
                                                         "held_out": len(work["val_keys"])}})
            tracking.log_manifest(config.data, work["digest"], "input")
        _fit(config, work, {"config": resolved, "rank_shards": work["rank_shards"], "val_keys": work["val_keys"],
                            "val_images": work["val_images"], "data_digest": work["digest"],
                            "mlflow_run_id": tracking.run_id,
                            "tracking_uri": tracking_uri() if config.mlflow else None,  # tracking_uri() makes ./mlruns
                            "export_uri": export_uri})
        export = read_manifest(export_uri, stage=STAGE)
        tracking.set_tags({"latentforge.export_uri": export_uri})
        tracking.log_manifest(export_uri, manifest_digest(export_uri), "output", name=f"{config.run_name}-export")
    return _result(config, export, export_uri, tracking.run_id, where, time.time() - started)


def _fit(config: AutoencoderTrainConfig, work: dict[str, Any], loop_config: dict[str, Any]) -> None:
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        autoencoder_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(name=config.run_name, storage_path=config.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=config.max_failures)))
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RuntimeError(f"training failed after {config.max_failures} restart(s): {exc}") from exc


def _result(config: AutoencoderTrainConfig, export: Any, export_uri: str, run_id: str | None, where: str,
            seconds: float) -> AutoencoderResult:
    metrics = dict(export.extra.get("metrics", {}))
    vae = export.models["vae"]
    skipped = {k[len("skipped_"):]: v for k, v in export.counts.items()
               if k.startswith("skipped_") and k != "skipped_steps"}
    rows = [("run", config.run_name), ("where", where), ("workers", config.num_workers),
            ("steps", export.extra["step"]), ("skipped steps (non-finite)", export.counts.get("skipped_steps", 0)),
            ("images seen", export.counts.get("samples_seen", 0)),
            ("samples left out (rank 0, first epoch)", skipped or "none"),
            ("held-out PSNR / SSIM", f"{metrics.get('psnr', float('nan')):.2f} dB / {metrics.get('ssim', float('nan')):.4f}"),
            ("latent", f"{vae['latent_channels']} channels, downsample {vae['downsample']}"),
            ("scaling factor (1/std)", f"{vae['scaling_factor']:.5f}"),
            ("wall time", f"{seconds:,.0f} s"), ("export", export_uri), ("mlflow run", run_id or "-")]
    return AutoencoderResult(run_name=config.run_name, export_uri=export_uri, mlflow_run_id=run_id,
                             step=int(export.extra["step"]), metrics=metrics, summary=summary_table(STAGE, rows))


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------

class AutoencoderWorkerRun:
    """One attempt of one rank: set-up (with resume), the step loop, evaluation and the export."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        from accelerate import Accelerator

        from latentforge.autoencoder.loop import AutoencoderTrainer
        from latentforge.training.loop import CheckpointPolicy

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.rank = ray.train.get_context().get_world_rank()
        self.loop_config = loop_config
        self.config = config = from_dict(AutoencoderTrainConfig, loop_config["config"])
        if loop_config.get("tracking_uri"):
            os.environ["MLFLOW_TRACKING_URI"] = loop_config["tracking_uri"]
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not config.use_gpu)
        self.trainer = AutoencoderTrainer(config, self.accelerator, self.rank)
        self.stream = self._stream(None)
        self.policy = CheckpointPolicy(config.checkpoint_every, config.steps)
        self.mlflow_run_id = loop_config.get("mlflow_run_id")
        self.tracking: StageRun | None = None
        self.metrics_logger: AsyncMetricLogger | None = None
        self.resumes = 0

    def _stream(self, position: aedata.StreamPosition | None) -> aedata.ImageStream:
        config = self.config
        return aedata.ImageStream(config.data, self.loop_config["rank_shards"][self.rank], config.resolution,
                                  config.resize_filter, config.seed, self.rank, self.loop_config["val_keys"], position)

    def resume(self) -> None:
        import ray.train

        from latentforge.training.checkpoint import CheckpointError

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            try:
                state, rank_state = self.trainer.load(directory)
            except CheckpointError as exc:
                raise RuntimeError(f"cannot resume from {checkpoint.path}: {exc}") from exc
        self.stream = self._stream(aedata.StreamPosition(**rank_state["position"]))
        self.mlflow_run_id = state.get("mlflow_run_id") or self.mlflow_run_id
        self.resumes = int(state.get("resumes", 0)) + 1
        if self.rank == 0:
            say(f"{STAGE}: resumed from {checkpoint.path} at step {self.trainer.step}")

    def open_tracking(self) -> None:
        """Rank 0 only: reattach the driver's MLflow run (the driver ends it)."""
        if self.rank == 0 and self.mlflow_run_id:
            self.tracking = StageRun(STAGE, run_id=self.mlflow_run_id).__enter__()
            self.metrics_logger = AsyncMetricLogger(self.tracking)

    def train(self) -> None:
        config = self.config
        while self.trainer.step < config.steps:
            result = self.trainer.train_step(self.stream.next_batch(config.batch_size))
            if self.metrics_logger is not None:
                self.metrics_logger.log({"loss": result.global_loss, "lr": result.lr, "grad_norm": result.grad_norm,
                                         **{f"loss/{k}": v for k, v in self.trainer.last_terms.items()}},
                                        step=result.step)
            if self.rank == 0 and (result.step % config.log_every == 0 or result.step == config.steps):
                say(f"{STAGE}: step {result.step}/{config.steps} | loss {result.global_loss:.4f} | "
                    f"lr {result.lr:.2e} | skipped {self.trainer.skipped_steps}")
            if self.policy.should_save(result.step, result.skipped):
                self.save_checkpoint({"step": result.step, "loss": result.global_loss})
            # The last step's evaluation is the export's (finish), not repeated here.
            if self.rank == 0 and config.eval_every and result.step % config.eval_every == 0 \
                    and result.step < config.steps:
                self.evaluate()

    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        import ray.train
        from ray.train import Checkpoint

        directory = tempfile.mkdtemp(prefix=f"lf-ae-ckpt-r{self.rank}-")
        try:
            self.trainer.save(directory, {"mlflow_run_id": self.mlflow_run_id, "resumes": self.resumes,
                                          "config": self.loop_config["config"]},
                              {"position": self.stream.position.to_dict()}, write_shared=self.rank == 0)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def evaluate(self) -> dict[str, float]:
        """Rank 0: PSNR / SSIM of the held-out reconstructions, and their grid as an MLflow artifact."""
        from latentforge.autoencoder.losses import reconstruction_grid, reconstruction_metrics

        images, step = self.loop_config["val_images"], self.trainer.step
        if not len(images):
            return {}
        pixels, reconstructions = self.trainer.reconstruct(images, self.config.batch_size)
        metrics = reconstruction_metrics(pixels, reconstructions)
        if self.metrics_logger is not None:
            self.metrics_logger.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        if self.tracking is not None:
            with tempfile.TemporaryDirectory(prefix="lf-ae-grid-") as tmp:
                path = os.path.join(tmp, f"reconstructions_step{step:06d}.png")
                reconstruction_grid(pixels[:8], reconstructions[:8], self.config.grid_scale).save(path)
                self.tracking.log_artifact(path, "reconstructions")
        say(f"{STAGE}: held-out at step {step}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")
        return metrics

    def finish(self) -> None:
        """Rank 0: final evaluation, the scaling factor measured on the data, the export."""
        if self.rank == 0:
            self._export(self.evaluate())
        self.accelerator.wait_for_everyone()

    def _export(self, metrics: dict[str, float]) -> None:
        from latentforge.autoencoder.export_writer import measure_scaling_factor, write_autoencoder_export

        config, trainer, lc = self.config, self.trainer, self.loop_config
        # The order of a fresh stream: the same images on every (re)run, never held-out ones.
        sample = self._stream(None).next_batch(config.scale_samples)
        scaling_factor, std = measure_scaling_factor(trainer.vae, sample, config.seed, config.batch_size)
        counts = {"steps": trainer.step, "skipped_steps": trainer.skipped_steps, "samples_seen": trainer.samples_seen,
                  **{f"skipped_{k}": v for k, v in self.stream.position.skipped.items()}}
        write_autoencoder_export(lc["export_uri"], trainer.vae, scaling_factor, config=lc["config"],
                                 data_dir=config.data, data_digest=lc["data_digest"], step=trainer.step,
                                 mlflow_run_id=self.mlflow_run_id, counts=counts,
                                 extra={"metrics": metrics, "held_out_keys": lc["val_keys"], "resumes": self.resumes,
                                        "scaling": {"latent_std": std, "images": len(sample)}})
        if self.tracking is not None:
            self.tracking.log_metrics({"scaling_factor": scaling_factor, **{f"final/{k}": v for k, v in metrics.items()}},
                                      step=trainer.step)
        if self.metrics_logger is not None:
            self.metrics_logger.close()
        say(f"{STAGE}: finished at step {trainer.step}; scaling factor {scaling_factor:.5f}; export at {lc['export_uri']}")


def autoencoder_worker(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker."""
    run = AutoencoderWorkerRun(loop_config)
    run.resume()
    run.open_tracking()
    run.train()
    run.finish()
