"""DDPM training objective built on diffusers' `DDPMScheduler` (`latentforge.diffusion.schedulers`).

The scheduler owns the forward process (`alphas_cumprod`, `add_noise`, `get_velocity`); this
module only adds what it lacks: timestep/noise sampling from an explicit generator (so training
is reproducible and resumable bit for bit), offset noise, min-SNR-gamma weighting, classifier-free
caption dropout and posterior sampling. Shapes: B batch, C latent channels, h x w latent size,
L text tokens, D text width.
"""

from __future__ import annotations

import torch

def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) long, uniform in [0, T)."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, offset_noise: float = 0.0) -> torch.Tensor:
    """eps ~ N(0, I) like latents (B, C, h, w); with offset noise, plus offset * N(0, 1) per (B, C).

    Offset noise (a per-channel constant shift) lets the model learn to change the mean
    brightness of an image, which plain i.i.d. noise barely perturbs at high SNR.
    """
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=latents.dtype)
    if offset_noise > 0:
        shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                            device=generator.device, dtype=latents.dtype)
        noise = noise + offset_noise * shift
    return noise


def sample_posterior(mean_std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 2, C, h, w) [mean, std] (already scaled) -> z = mean + std * eps, (B, C, h, w)."""
    mean, std = mean_std[:, 0], mean_std[:, 1]
    eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
    return mean + std * eps


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts: eps itself, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0. (B, C, h, w)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) at each timestep, (B,) float32."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha = alphas_cumprod[timesteps]
    return alpha / (1.0 - alpha)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), (B,).

    The x0-space weight min(SNR, gamma) expressed for the model's target: divide by SNR for
    epsilon prediction, by SNR + 1 for v prediction. gamma <= 0 means no weighting (all ones).
    """
    if gamma <= 0:
        return torch.ones_like(snr_t)
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over C, h, w per sample, times its weight, mean over the batch -> scalar (float32)."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()


def caption_dropout(text: torch.Tensor, mask: torch.Tensor, empty_text: torch.Tensor, p: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Swap in the empty caption's embedding for a random fraction p of the batch (CFG training).

    text (B, L, D) padded states, mask (B, L) 1 = real token, empty_text (L_e, D) with L_e <= L
    (the collate pads to at least L_e). Returns new text, mask and the (B,) bool dropped flags.
    """
    dropped = torch.rand((text.shape[0],), generator=generator, device=generator.device) < p
    if p <= 0 or not bool(dropped.any()):
        return text, mask, dropped
    length = empty_text.shape[0]
    if length > text.shape[1]:
        raise ValueError(f"empty caption has {length} tokens but the batch is padded to {text.shape[1]}")
    empty_row = torch.zeros_like(text[0])
    empty_row[:length] = empty_text.to(text.dtype)
    empty_mask = torch.zeros_like(mask[0])
    empty_mask[:length] = 1
    where = dropped.to(text.device)
    text = torch.where(where[:, None, None], empty_row[None], text)
    mask = torch.where(where[:, None], empty_mask[None], mask)
    return text, mask, dropped
