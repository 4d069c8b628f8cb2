"""The autoencoder stage as a Ray Train graph: ingest shards --> TorchTrainer workers running Accelerate.

    driver: `pipelines.ray_train_driver.run_training` with `AutoencoderKind`: read the ingest
            manifest, check the init model, deal shards to ranks, pick the held-out images (all
            here), then the shared steps (storage checks, resume, the run's single MLflow run,
            TorchTrainer.fit() with each node's own address for the process group, lineage)
    worker: `AutoencoderWorker`, the shared worker skeleton with an AutoencoderTrainer over its own
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
import tempfile
from typing import Any

from latentforge.autoencoder import data as aedata
from latentforge.autoencoder.config import AutoencoderTrainConfig
from latentforge.config import ConfigError
from latentforge.manifest import Manifest, manifest_digest
from pipelines.ray_train_driver import TrainingKind, TrainingPlan, TrainResult, read_data_manifest, run_training
from pipelines.ray_train_worker import TrainingWorker, run_worker, say

log = logging.getLogger("latentforge.autoencoder")
STAGE = "autoencoder"


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


class AutoencoderKind(TrainingKind):
    """The autoencoder for the shared driver: its data plan, resume check and summary rows."""

    stage = STAGE

    @staticmethod
    def worker(loop_config: dict[str, Any]) -> None:
        """The function Ray Train runs on every worker."""
        run_worker(AutoencoderWorker, loop_config)

    def plan(self) -> TrainingPlan:
        """Shards per rank, held-out images, the init model's config: decided once, before Ray starts."""
        config = self.config
        config.data, manifest = read_data_manifest(config.data, "ingest")
        check_init(config)
        rank_shards = aedata.deal_shards(manifest, config.num_workers)
        val_keys, val_images = aedata.held_out(config.data, manifest, config.val_samples, config.resolution,
                                               config.resize_filter)
        if config.val_samples and not val_keys:
            raise ConfigError(f"{config.data}: no decodable image to hold out for PSNR / SSIM")
        return TrainingPlan(data_digest=manifest_digest(config.data),
                            loop_config={"rank_shards": rank_shards, "val_keys": val_keys, "val_images": val_images},
                            derived={"held_out": len(val_keys)}, run_state={"num_workers": config.num_workers})

    def check_resume(self, previous: dict[str, Any], plan: TrainingPlan) -> None:
        config = self.config
        if previous.get("num_workers", config.num_workers) != config.num_workers:
            raise ConfigError(f"cannot resume run {config.run_name!r} with {config.num_workers} workers: it was "
                              f"started with {previous['num_workers']} (each rank's data position is its own)")

    def summary_rows(self, export: Manifest) -> list[tuple[str, Any]]:
        metrics, vae = export.extra.get("metrics", {}), export.models["vae"]
        skipped = {k[len("skipped_"):]: v for k, v in export.counts.items()
                   if k.startswith("skipped_") and k != "skipped_steps"}
        return [("images seen", export.counts.get("samples_seen", 0)),
                ("samples left out (rank 0, first epoch)", skipped or "none"),
                ("held-out PSNR / SSIM",
                 f"{metrics.get('psnr', float('nan')):.2f} dB / {metrics.get('ssim', float('nan')):.4f}"),
                ("latent", f"{vae['latent_channels']} channels, downsample {vae['downsample']}"),
                ("scaling factor (1/std)", f"{vae['scaling_factor']:.5f}")]

    def result_metrics(self, export: Manifest, fit_result: Any) -> dict[str, Any]:
        """The held-out PSNR / SSIM of the export."""
        return dict(export.extra.get("metrics", {}))


def run(config: AutoencoderTrainConfig) -> TrainResult:
    """Train the autoencoder with the shared Ray Train driver."""
    return run_training(AutoencoderKind(config))


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------

class AutoencoderWorker(TrainingWorker):
    """The autoencoder's part of one attempt of one rank: its stream, step, evaluation and export."""

    stage = STAGE
    config_cls = AutoencoderTrainConfig
    evaluates_in_finish = True  # the last step's evaluation is the export's

    def __init__(self, loop_config: dict[str, Any]) -> None:
        from latentforge.autoencoder.loop import AutoencoderTrainer

        super().__init__(loop_config)
        self.trainer = AutoencoderTrainer(self.config, self.accelerator, self.rank)
        self.stream = self._stream(None)

    def _stream(self, position: aedata.StreamPosition | None) -> aedata.ImageStream:
        config = self.config
        return aedata.ImageStream(config.data, self.loop_config["rank_shards"][self.rank], config.resolution,
                                  config.resize_filter, config.seed, self.rank, self.loop_config["val_keys"], position)

    def read_checkpoint(self, directory: str) -> dict[str, Any]:
        state, rank_state = self.trainer.load(directory)
        self.stream = self._stream(aedata.StreamPosition(**rank_state["position"]))
        return state

    def write_checkpoint(self, directory: str, state: dict[str, Any]) -> None:
        self.trainer.save(directory, state, {"position": self.stream.position.to_dict()}, write_shared=self.rank == 0)

    def train_step(self) -> Any:
        result = self.trainer.train_step(self.stream.next_batch(self.config.batch_size))
        if self.metrics_logger is not None:
            self.metrics_logger.log({"loss": result.global_loss, "lr": result.lr, "grad_norm": result.grad_norm,
                                     **{f"loss/{k}": v for k, v in self.trainer.last_terms.items()}}, step=result.step)
        return result

    def log_progress(self, result: Any) -> None:
        say(f"{STAGE}: step {result.step}/{self.config.steps} | loss {result.global_loss:.4f} | "
            f"lr {result.lr:.2e} | skipped {self.trainer.skipped_steps}")

    def evaluate(self, step: int) -> dict[str, float]:
        """Rank 0: PSNR / SSIM of the held-out reconstructions, and their grid as an MLflow artifact."""
        from latentforge.autoencoder.losses import reconstruction_grid, reconstruction_metrics

        images = self.loop_config["val_images"]
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

    def export(self, last: Any, steps_done: int, elapsed: float) -> None:
        """The final evaluation, the scaling factor measured on the data, the export."""
        from latentforge.autoencoder.export_writer import measure_scaling_factor, write_autoencoder_export

        config, trainer, lc = self.config, self.trainer, self.loop_config
        metrics = self.evaluate(trainer.step)
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
