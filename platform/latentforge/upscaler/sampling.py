"""Sampling an upscaler: low-res images (+ prompts) -> high-res images, through the ordinary `Sampler`.

`ImageConditionedUNet` makes the upscaler UNet look like a latent UNet to `Sampler` (in_channels =
latent channels): each call concatenates the noise-augmented low-res image to the latents and passes
the noise level as class label, as `StableDiffusionUpscalePipeline` does. So the scheduler loop,
classifier-free guidance (both halves see the same image) and the decoding are the base model's.

Per image, the augmentation noise comes from its own generator seeded from the image's seed (a
stream apart from the latent noise's), so an image depends on its own seed only.

An export that records `residual_scale` learnt the residual over the latent of the bicubic upsample
(`latentforge.upscaler.residual`): `ResidualDecoder` adds that base back before decoding, and its
timesteps are spaced "trailing" (Lin et al. 2024, "Common diffusion noise schedules and sample steps
are flawed"): the first step is at the last training timestep, where the start latent's pure noise
belongs. With the training schedule's "leading" spacing a 1-step DDIM ran the UNet at t = 0 on pure
noise (6 dB PSNR) and a 5-step one started at t = 800. Exports without the residual (made before it)
keep the training schedule's spacing: they sample as diffusers' StableDiffusionUpscalePipeline does.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from latentforge.upscaler.conditioning import augment, check_noise_level, make_low_res_scheduler
from latentforge.upscaler.degradation import lowres_pixels
from latentforge.upscaler.residual import BaseLatents, ResidualDecoder

AUGMENT_SEED_SALT = 0x5EED_A06
"""XORed into an image's seed for its augmentation-noise generator (the latent noise uses the seed itself)."""
TIMESTEP_SPACING = "trailing"
"""How a residual export's sampling steps are spread over the training timesteps (module docstring: why)."""


class InputSizeError(ValueError):
    """A low-res input whose size is not the one the upscaler was trained for."""


class ImageConditionedUNet(torch.nn.Module):
    """The upscaler UNet seen as a latent UNet; `condition` sets the batch's low-res image and level."""

    def __init__(self, unet: Any, latent_channels: int) -> None:
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.unet = unet
        self.config = FrozenDict({**unet.config, "in_channels": latent_channels})
        self.image: torch.Tensor | None = None
        self.levels: torch.Tensor | None = None

    def condition(self, image: torch.Tensor, levels: torch.Tensor) -> None:
        """(B, 3, h, w) augmented low-res images and their (B,) noise levels for the next sampling run."""
        self.image, self.levels = image, levels

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        if self.image is None or self.levels is None:
            raise RuntimeError("ImageConditionedUNet: no low-res image set (call condition first)")
        repeat = sample.shape[0] // self.image.shape[0]  # classifier-free guidance: [uncond; cond]
        image = self.image.to(sample.device, sample.dtype).repeat(repeat, 1, 1, 1)
        kwargs["class_labels"] = self.levels.to(sample.device).repeat(repeat)
        return self.unet(torch.cat([sample, image], dim=1), timestep, **kwargs)


class Upscaler:
    """An upscaler export, ready to sample: `upscale(low-res uint8 images, prompts, seeds, params, level)`."""

    def __init__(self, export: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 text_states: str = "auto") -> None:
        self.record = upscaler_record(export)
        self.unet = ImageConditionedUNet(export.unet, int(self.record["latent_channels"]))
        self.sampler = export.sampler(device=device, dtype=dtype, text_states=text_states, unet=self.unet)
        self.base_latents = self._residual(self.record.get("residual_scale"))
        self.low_res_scheduler = make_low_res_scheduler(self.record.get("low_res_scheduler"))
        self.export_dir = export.export_dir

    def _residual(self, scale: float | None) -> BaseLatents | None:
        """A residual export's base-latent maker, its decoder and spacing put in the sampler; None for a plain one."""
        if not scale:
            return None
        self.sampler.scheduler_config["timestep_spacing"] = TIMESTEP_SPACING
        base_latents = BaseLatents(self.sampler.vae, self.resolution)
        self.sampler.vae = ResidualDecoder(self.sampler.vae, float(scale))
        return base_latents

    @property
    def lowres_size(self) -> int:
        return int(self.record["lowres_size"])

    @property
    def resolution(self) -> int:
        return int(self.record["resolution"])

    def check_input(self, height: int, width: int, what: str) -> None:
        if (height, width) != (self.lowres_size, self.lowres_size):
            raise InputSizeError(
                f"{what} is {height}x{width} px but upscaler {self.export_dir} takes {self.lowres_size}x"
                f"{self.lowres_size} (1/{self.record['lowres_factor']} of its {self.resolution} px)")

    def augmented(self, images: np.ndarray, seeds: Sequence[int], level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, h, w, 3) -> (augmented (B, 3, s, s) at the latent size s, levels (B,))."""
        pixels = lowres_pixels(images, int(self.record["latent_size"]))
        levels = torch.full((len(images),), int(level), dtype=torch.long)
        rows = []
        for i, seed in enumerate(seeds):
            gen = torch.Generator(device="cpu").manual_seed(int(seed) ^ AUGMENT_SEED_SALT)
            rows.append(augment(pixels[i:i + 1], levels[i:i + 1], self.low_res_scheduler, gen))
        return torch.cat(rows), levels

    @torch.no_grad()
    def upscale(self, images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], params: Any,
                noise_level: int) -> list[Any]:
        """One high-res `GeneratedImage` per low-res uint8 image (B, h, w, 3), prompt and seed."""
        check_noise_level(noise_level, int(self.record["noise_level_range"][1]))
        self.check_input(images.shape[1], images.shape[2], "the low-res input")
        image, levels = self.augmented(images, seeds, noise_level)
        self.unet.condition(image.to(self.sampler.device, self.sampler.dtype), levels)
        if self.base_latents is not None:
            self.sampler.vae.rebase(*self.base_latents(images))
        out = self.sampler.txt2img(list(prompts), list(seeds), params, batch_size=len(prompts))
        for item in out:
            item.meta.update(noise_level=int(noise_level), upscaler=self.export_dir)
        return out


def upscaler_record(export: Any) -> dict[str, Any]:
    """The export manifest's `extra.upscaler`; ValueError when the export is a base model."""
    record = (export.manifest.extra if export.manifest is not None else {}).get("upscaler")
    if not record:
        raise ValueError(f"{export.export_dir} is not an upscaler (train one with jobs/train.py --stage upscaler)")
    return record
