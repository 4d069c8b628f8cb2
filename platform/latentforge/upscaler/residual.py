"""The residual formulation of the upscaler: it diffuses what bicubic upsampling misses.

    z_base = E(bicubic(low-res) at the high-res size)        the autoencoder's latent of the bicubic upsample
    r      = (z_high - z_base) * residual_scale              what the UNet learns (training)
    x      = D(z_base + r_hat / residual_scale) + (bicubic - D(z_base))     what sampling returns

The last term removes the decoder's own error on the bicubic base, the same error (to first order)
that it makes on the nearby output: with the demo's AutoencoderKL, whose reconstruction of 32 px
scenes is itself only 26.9 dB, the decoded output scored 26.7 dB and this one 27.4 dB (bicubic 26.8).
With the patchify autoencoder D(z_base) is the bicubic image and the term is zero.

As ResShift (and SR3 / SD x4, whose UNets see the bicubic / low-res image) the model only adds
detail: a model that predicts r_hat = 0 returns exactly the bicubic upsample. Why it is needed:
trained to produce z_high itself, a tiny upscaler must first learn to reproduce the low-res content
through its whole UNet, and a CI-sized budget (300 steps) left it at 20 dB where bicubic reaches
26.8 dB (docs/super_resolution.md "Measured quality"). The residual is small (pixel rms 0.09 on the
demo scenes), so it is scaled up to about unit variance before diffusion, SD's 1/std rule for latents:
without the scale the residual's signal-to-noise ratio is about 1/20 of the latents' at every step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from latentforge.pixels import to_pixels
from latentforge.upscaler.degradation import bicubic_upsample

RESIDUAL_SCALE = 10.0
"""Multiplies z_high - z_base: about 1 / its rms on the demo scenes (0.092 in [-1, 1] pixels, patchify)."""


class BaseLatents:
    """Low-res uint8 images (B, h, w, 3) -> their bicubic upsample: pixels (B, 3, R, R) in [-1, 1] and
    latents z_base (B, C, R/d, R/d)."""

    def __init__(self, vae: Any, resolution: int) -> None:
        self.vae, self.resolution = vae, resolution

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = to_pixels(bicubic_upsample(images, self.resolution))
        return pixels, self.vae.encode(pixels.to(self.vae.device, self.vae.dtype), mode="mean")


def to_residual(latent: torch.Tensor, base: torch.Tensor, scale: float) -> torch.Tensor:
    """A stored latent (C, h, w), or (2, C, h, w) posterior mean and std, as the residual the UNet learns."""
    if latent.dim() == base.dim() + 1:  # mean_std: the residual's posterior is the latent's, shifted
        return torch.stack([(latent[0] - base) * scale, latent[1] * scale])
    return (latent - base) * scale


class ResidualDecoder:
    """The sampler's autoencoder for a residual upscaler: `decode(r)` is the module docstring's x, so
    `Sampler`'s own loop and decoding stay those of a plain latent model; `rebase` sets the batch's base."""

    def __init__(self, vae: Any, scale: float) -> None:
        self.vae, self.scale = vae, scale
        self.base: torch.Tensor | None = None
        self.offset: torch.Tensor | None = None

    @torch.no_grad()
    def rebase(self, pixels: torch.Tensor, base: torch.Tensor) -> None:
        """The batch's bicubic pixels (B, 3, R, R) and their latents z_base (B, C, h, w)."""
        self.base = base
        self.offset = pixels.to(base.device, base.dtype) - self.vae.decode(base)  # the decoder's error on the base

    def __getattr__(self, name: str) -> Any:  # everything but decode is the autoencoder's own
        return getattr(self.__dict__["vae"], name)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.base is None or self.offset is None:
            raise RuntimeError("ResidualDecoder: no base set (call rebase first)")
        decoded = self.vae.decode(self.base.to(latents.device, latents.dtype) + latents / self.scale)
        return (decoded + self.offset.to(decoded.device, decoded.dtype)).clamp(-1, 1)
