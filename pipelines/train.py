"""Train as a Ray Train graph: latent shards --Ray Data--> TorchTrainer workers running Accelerate.

    driver: `pipelines.ray_train_driver.run_training` with `UNetKind`: read + check the precompute
            manifest, resolve and check the UNet against it, plan the data order (all here), then
            the shared steps (storage checks, resume, the run's single MLflow run, TorchTrainer.fit(),
            lineage) and the export formats
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
from typing import Any

from latentforge import storage
from latentforge.config import ConfigError
from latentforge.manifest import Manifest, manifest_digest
from latentforge.conditioning.embedding import with_conditions
from latentforge.conditioning.spec import ConditionSet
from latentforge.models.unet import UNetConfigError, check_latent_size, resolve_unet_config
from latentforge.training import data as tdata
from latentforge.training.config import TrainConfig
from latentforge.upscaler.training import upscaler_setup, upscaler_unet
from pipelines.ray_train_driver import TrainingKind, TrainingPlan, TrainResult, read_data_manifest, run_training
from pipelines.train_worker import train_worker


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


def _eval_failures_text(summary: dict[str, Any]) -> str:
    count = int(summary.get("eval_failures", 0))
    return f"{count} (last: {summary['eval_last_failure']})" if count else "0"


class UNetKind(TrainingKind):
    """The UNet (base or upscaler) for the shared driver: its data checks, streams, summary and export formats."""

    stage = "train"
    worker = staticmethod(train_worker)

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.data_plan: tdata.DataPlan | None = None

    def plan(self) -> TrainingPlan:
        config = self.config
        config.data, manifest = read_data_manifest(config.data, "precompute")
        try:
            unet_config = check_data(config, manifest)
            self.data_plan = plan = tdata.plan_data(manifest, config.num_workers, config.samples_per_step,
                                                    config.shuffle_buffer, config.seed, config.val_samples)
        except (UNetConfigError, tdata.DataPlanError) as exc:
            raise ConfigError(str(exc)) from exc
        self._preflight(manifest)
        return TrainingPlan(
            data_digest=manifest_digest(config.data),
            loop_config={"unet_config": unet_config, "manifest": manifest.to_dict(), "plan": plan.to_dict()},
            derived={"steps_per_epoch": plan.steps_per_epoch, "train_samples": plan.train_total,
                     "val_samples": plan.val_samples,
                     "unet_parameters_config": json.dumps(unet_config, sort_keys=True)[:5000]},
            run_state={"data_plan": plan.to_dict()})

    def _preflight(self, manifest: Manifest) -> None:
        """The in-training eval and the export formats, refused now rather than after training."""
        config = self.config
        if config.eval_prompts:
            from latentforge.evaluation.in_training import check_can_start

            check_can_start(config.eval_config(), config.data, manifest)  # before any worker exists
        if config.export_formats:
            from pipelines.export import preflight

            upscaler = upscaler_setup(config, manifest).record(manifest) if config.stage == "upscaler" else None
            preflight(manifest, config.export_formats, config.mlflow, upscaler)

    def datasets(self, plan: TrainingPlan) -> dict[str, Any]:
        return build_datasets(self.config, self.data_plan)

    def check_resume(self, previous: dict[str, Any], plan: TrainingPlan) -> None:
        try:
            tdata.check_same_plan(previous.get("data_plan", {}), self.data_plan)
        except tdata.DataPlanError as exc:
            raise ConfigError(f"cannot resume run {self.config.run_name!r}: {exc}") from exc

    def summary_rows(self, export: Manifest) -> list[tuple[str, Any]]:
        numbers = export.extra.get("summary", {})
        return [("samples seen", export.counts.get("samples_seen", 0)),
                ("final loss", f"{numbers.get('final_loss', float('nan')):.4f}"),
                ("samples/s (mean, this attempt)", f"{numbers.get('samples_per_s', 0.0):,.1f}"),
                ("data-wait share", f"{100 * numbers.get('data_wait_share', 0.0):.1f} %"),
                ("resumes (restarts + reruns)", numbers.get("resumes", 0)),
                ("in-training eval failures", _eval_failures_text(numbers)),
                ("metric values dropped (MLflow)", numbers.get("metrics_dropped", 0))]

    def after_export(self, export_uri: str) -> list[tuple[str, Any]]:
        """The export formats asked for (diffusers, single-file, mlflow), each written from the export."""
        if not self.config.export_formats:
            return []
        from pipelines.export import export_formats

        exported = export_formats(export_uri, self.config.export_formats)
        return [(f"exported ({fmt})", out) for fmt, out in zip(self.config.export_formats, exported)]


def run(config: TrainConfig) -> TrainResult:
    """Train the UNet (base or upscaler) with the shared Ray Train driver."""
    return run_training(UNetKind(config))
