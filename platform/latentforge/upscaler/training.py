"""The upscaler inside the train stage: its data check, the per-sample low-res transform, the export record.

The train stage runs an upscaler with the same driver, workers, data order, checkpoints and MLflow
run as a base model (`--stage upscaler`); only three things differ, all made here:
- the data must hold the preprocessed images (precompute `--store-pixels`);
- each decoded sample gets its low-res input (`UpscalerSetup.transform`), made from its stored
  pixels by `Degradation` for (seed, key, epoch): a resumed run sees the same pairs; its latent
  becomes the scaled residual over the latent of the low-res image's bicubic upsample
  (`latentforge.upscaler.residual`), encoded by the data's own autoencoder (`--no-residual`: kept as is);
- the trainer concatenates the noise-augmented low-res image to the noisy latents and passes the
  noise level as the class label (`latentforge.upscaler.conditioning.TrainingCondition`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from latentforge import formats
from latentforge.config import ConfigError
from latentforge.manifest import Manifest
from latentforge.upscaler.conditioning import IMAGE_CHANNELS, LOW_RES_SCHEDULER
from latentforge.upscaler.degradation import Degradation, lowres_pixels
from latentforge.upscaler.residual import RESIDUAL_SCALE, BaseLatents, to_residual

STAGES = ("base", "upscaler")


@dataclass(frozen=True)
class UpscalerSetup:
    """One upscaler run's low-res recipe, fixed by its config and data."""

    degradation: Degradation
    max_noise_level: int
    resolution: int
    """Side of the stored high-res images (px)."""
    latent_size: int
    """Side of the latents: the low-res image is resized to it before the concatenation."""
    manifest: Manifest = field(repr=False, compare=False)
    """The data's manifest: its autoencoder encodes the bicubic upsample the residual is taken from."""
    residual_scale: float | None = RESIDUAL_SCALE
    """The residual's scale (`latentforge.upscaler.residual`); None = the UNet learns the high-res latent itself."""

    @property
    def lowres_size(self) -> int:
        return self.resolution // self.degradation.factor

    @cached_property
    def base_latents(self) -> BaseLatents:
        """Loaded on first use, in the worker that feeds the data (the driver never encodes)."""
        from latentforge.models.vae import load_vae_from_manifest

        return BaseLatents(load_vae_from_manifest(self.manifest), self.resolution)

    def transform(self, sample: dict[str, Any], row: dict[str, Any], epoch: int) -> dict[str, Any]:
        """A decoded sample + `lowres` (3, h, w) in [-1, 1], made from its tar row's stored pixels (R, R, 3),
        with its latent replaced by the scaled residual over the latent of the low-res bicubic upsample."""
        low = self.degradation.apply(formats.decode_npy(row[formats.PIXELS_MEMBER]), sample["key"], epoch)
        sample["lowres"] = lowres_pixels(low[None], self.latent_size)[0]
        if self.residual_scale:
            _, base = self.base_latents(low[None])  # (1, C, h, w)
            sample["latent"] = to_residual(sample["latent"], base[0].to(sample["latent"].dtype), self.residual_scale)
        return sample

    def record(self, manifest: Manifest) -> dict[str, Any]:
        """What the export's manifest says about this stage (`extra.upscaler`); sampling reads it."""
        vae = manifest.models.get("vae", {})
        channels = int(manifest.extra["latent_shape"][0])
        return {"in_channels": channels + IMAGE_CHANNELS, "latent_channels": channels,
                "noise_level_range": [0, self.max_noise_level], "scaling_factor": vae.get("scaling_factor"),
                "lowres_factor": self.degradation.factor, "lowres_size": self.lowres_size,
                "resolution": self.resolution, "latent_size": self.latent_size,
                "degradation": {"blur": self.degradation.blur, "jpeg": self.degradation.jpeg},
                "low_res_scheduler": dict(LOW_RES_SCHEDULER),
                **({"residual_scale": self.residual_scale} if self.residual_scale else {})}


def upscaler_setup(config: Any, manifest: Manifest) -> UpscalerSetup:
    """The setup of an upscaler run (`config`: a TrainConfig); ConfigError when the data cannot feed it."""
    pixels = manifest.extra.get("pixels") or {}
    if not pixels:
        raise ConfigError(f"{config.data} holds no pixels: the upscaler stage makes its low-res inputs from the "
                          "high-res images; precompute the data with --store-pixels")
    resolution, latent_size = int(pixels["size"][0]), int(manifest.extra["latent_shape"][1])
    if resolution % config.lowres_factor:
        raise ConfigError(f"--lowres-factor {config.lowres_factor} does not divide the data's resolution "
                          f"{resolution}")
    return UpscalerSetup(degradation_of(config), config.max_noise_level, resolution, latent_size, manifest,
                         RESIDUAL_SCALE if config.residual else None)


def degradation_of(config: Any) -> Degradation:
    try:
        return Degradation(config.lowres_factor, config.lowres_blur, config.lowres_jpeg, config.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def check_options(config: Any) -> None:
    """TrainConfig's upscaler options, checked at config time."""
    if config.stage not in STAGES:
        raise ConfigError(f"stage must be one of {list(STAGES)}, got {config.stage!r}")
    if config.stage != "upscaler":
        return
    degradation_of(config)
    limit = LOW_RES_SCHEDULER["num_train_timesteps"] - 1
    if not 0 <= config.max_noise_level <= limit:
        raise ConfigError(f"max_noise_level must be in [0, {limit}] (the low-res noise schedule), "
                          f"got {config.max_noise_level}")
    if config.eval_prompts:
        raise ConfigError("--stage upscaler has no in-training text-to-image eval yet; drop --eval-prompts")
    if set(config.export_formats) - {"diffusers"}:
        raise ConfigError("--stage upscaler exports as a diffusers StableDiffusionUpscalePipeline folder only; "
                          "use --export-formats diffusers")


def upscaler_unet(config: Any, manifest: Manifest, channels: int, text_width: int, latent_size: int) -> dict[str, Any]:
    """The upscaler's UNet config, after checking the data can feed it (before any worker starts)."""
    from latentforge.models.unet import UNetConfigError
    from latentforge.upscaler.conditioning import resolve_upscaler_unet

    if manifest.extra.get("conditions"):
        raise ConfigError(f"{config.data} records class / scalar conditions, but an upscaler's class label is its "
                          "noise level: train the upscaler on data precomputed without --condition")
    upscaler_setup(config, manifest)
    try:
        return resolve_upscaler_unet(config.unet, channels, text_width, latent_size, config.max_noise_level)
    except UNetConfigError as exc:
        raise ConfigError(str(exc)) from exc
