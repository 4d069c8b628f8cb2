"""The upscaler UNet's image condition: noise augmentation of the low-res input and the UNet's shape.

Noise augmentation (SD x4 upscaler, DeepFloyd IF stage II): the low-res image x is noised as
    x_l = sqrt(a_l) * x + sqrt(1 - a_l) * eps,   a_l = alphas_cumprod[l] of `LOW_RES_SCHEDULER`
(diffusers' `DDPMScheduler.add_noise`, what `StableDiffusionUpscalePipeline` does with its
`low_res_scheduler`), and the level l goes to the UNet as its class label. Training draws l
uniformly from [0, max_noise_level]; sampling uses one chosen level (`--noise-level`):
- level 0 is *nearly* clean, as in diffusers: x_0 = 0.99995 x + 0.0100 eps;
- level 350 (SD's max): 0.800 x + 0.600 eps; level 999: 0.027 x + 0.9996 eps.
A level above the trained `max_noise_level` has no class embedding and is refused.

The UNet: in_channels = latent channels + 3 (the image), out_channels = latent channels,
num_class_embeds = max_noise_level + 1 (SD x4's layout; its config has 7 / 4 / 1000). Besides the
base presets, `UPSCALER_PRESETS` has `tiny-sr`: no attention at all (text unused), 64 channels at
full latent resolution, what a CPU-sized upscaler needs (docs/super_resolution.md "Measured quality").
"""

from __future__ import annotations

from typing import Any

import torch

IMAGE_CHANNELS = 3
LOW_RES_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                     "beta_start": 0.0001, "beta_end": 0.02}
"""stabilityai/stable-diffusion-x4-upscaler low_res_scheduler/scheduler_config.json (its noise schedule)."""


UPSCALER_PRESETS: dict[str, dict[str, Any]] = {
    # Upsampling is local: convolutions at full latent resolution do it, attention over a 16 x 16 latent
    # only costs time. Against `tiny` (attention, 32 channels at full resolution): about 3x faster per
    # step on the shared 2-core CPU and 27.3 dB instead of 27.0 dB held-out PSNR after the same 300 steps.
    "tiny-sr": {"down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
                "block_out_channels": [64, 64], "layers_per_block": 1, "norm_num_groups": 8,
                "mid_block_type": None},
}
"""Adaptive UNet presets for upscalers only: channels and text width come from the data, as `tiny`'s."""


class NoiseLevelError(ValueError):
    """A noise level outside [0, max_noise_level] of the upscaler."""


def make_low_res_scheduler(config: dict[str, Any] | None = None) -> Any:
    """The noise-augmentation schedule (SD x4's unless the export recorded another), from the one
    scheduler factory; only its `add_noise` is used, so the sampling settings it applies are inert."""
    from latentforge.diffusion.schedulers import make_scheduler

    return make_scheduler("ddpm", {**LOW_RES_SCHEDULER, **(config or {})})


def check_noise_level(level: int, max_noise_level: int) -> None:
    if not 0 <= level <= max_noise_level:
        raise NoiseLevelError(f"noise level {level} is outside the upscaler's trained range [0, {max_noise_level}]")


def augment(images: torch.Tensor, levels: torch.Tensor, scheduler: Any, generator: torch.Generator) -> torch.Tensor:
    """Noise (B, 3, h, w) low-res images to their (B,) levels with `scheduler.add_noise`."""
    noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=images.dtype)
    return scheduler.add_noise(images, noise.to(images.device), levels.to(images.device))


def sample_levels(batch: int, max_noise_level: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) long, uniform in [0, max_noise_level]."""
    return torch.randint(0, max_noise_level + 1, (batch,), generator=generator, device=generator.device)


class TrainingCondition:
    """What the trainer adds for an upscaler: augmented low-res images concatenated to the noisy latents."""

    def __init__(self, max_noise_level: int) -> None:
        self.max_noise_level = max_noise_level
        self.scheduler = make_low_res_scheduler()

    def model_input(self, noisy: torch.Tensor, lowres: torch.Tensor, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents (B, C, h, w), low-res (B, 3, h, w)) -> ((B, C+3, h, w), levels (B,))."""
        levels = sample_levels(noisy.shape[0], self.max_noise_level, generator)
        image = augment(lowres.to(noisy.device, noisy.dtype), levels, self.scheduler, generator)
        return torch.cat([noisy, image], dim=1), levels.to(noisy.device)


def resolve_upscaler_unet(preset_or_config_path: str, latent_channels: int, text_width: int, sample_size: int,
                          max_noise_level: int) -> dict[str, Any]:
    """The upscaler's UNet config: an adaptive preset shaped for it, or a config file checked against it."""
    from latentforge.models.unet import ADAPTIVE_PRESETS, UNetConfigError, resolve_unet_config

    if preset_or_config_path in UPSCALER_PRESETS:
        return {**UPSCALER_PRESETS[preset_or_config_path], "in_channels": latent_channels + IMAGE_CHANNELS,
                "out_channels": latent_channels, "cross_attention_dim": text_width, "sample_size": sample_size,
                "num_class_embeds": max_noise_level + 1, "class_embed_type": None}
    config = resolve_unet_config(preset_or_config_path, latent_channels, text_width, sample_size,
                                 image_channels=IMAGE_CHANNELS)
    if preset_or_config_path in ADAPTIVE_PRESETS:
        return {**config, "num_class_embeds": max_noise_level + 1, "class_embed_type": None}
    if (config.get("num_class_embeds") or 0) <= max_noise_level or config.get("class_embed_type") is not None:
        raise UNetConfigError(f"UNet {preset_or_config_path!r} cannot take noise level {max_noise_level} as its "
                              f"class label: num_class_embeds {config.get('num_class_embeds')} (needs > "
                              f"{max_noise_level}), class_embed_type {config.get('class_embed_type')} (needs none)")
    return config
