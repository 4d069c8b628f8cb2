"""The encoder step: preprocessed uint8 images + captions -> stored latents and text states.

``PrecomputeEncoder`` is what every encoder actor holds (and what the fidelity gate and the
benchmark's plain loop use), so all paths compute the bytes the same way.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from latentforge.formats import tensor_to_storage, torch_dtype
from latentforge.models.text_encoder import TextEncoder, load_text_encoder
from latentforge.models.vae import LatentVAE, VaeSpec, load_vae
from latentforge.precompute.config import PrecomputeConfig
from latentforge.pixels import to_pixels
from latentforge.precompute.preprocess import SKIP_NONFINITE_LATENT, SKIP_NONFINITE_TEXT, STATUS_OK


def resolve_compute_dtype(config: PrecomputeConfig, device: torch.device) -> torch.dtype:
    name = config.compute_dtype
    if name == "auto":
        name = config.dtype if device.type == "cuda" else "fp32"
    return torch_dtype(name)


def vae_spec(config: PrecomputeConfig) -> VaeSpec:
    return VaeSpec(type=config.vae_type, id=config.vae, patch_size=config.patch_size)


def key_noise(keys: list[str], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise per key (B, *shape), reproducible from (seed, key) alone."""
    out = torch.empty((len(keys), *shape), dtype=torch.float32)
    for i, key in enumerate(keys):
        digest = hashlib.sha256(f"{seed}:{key}:posterior".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        out[i] = torch.randn(shape, generator=gen)
    return out


class PrecomputeEncoder:
    """VAE + text encoder for one device; ``encode_batch`` fills the output columns of a batch."""

    def __init__(self, config: PrecomputeConfig, device: str | torch.device | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.compute_dtype = compute_dtype or resolve_compute_dtype(config, self.device)
        self.vae: LatentVAE = load_vae(vae_spec(config), self.device, self.compute_dtype)
        self.text: TextEncoder = load_text_encoder(config.text_encoder, config.text_encoder_weights,
                                                   config.text_layer, self.device, self.compute_dtype)
        side = config.resolution // self.vae.downsample
        self.latent_shape = (self.vae.latent_channels, side, side)

    @property
    def stored_latent_shape(self) -> tuple[int, ...]:
        return (2, *self.latent_shape) if self.config.latent == "mean_std" else self.latent_shape

    def latents(self, pixels: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """Scaled latents (B, C, h, w) or (B, 2, C, h, w) in float32, per ``config.latent``."""
        mean, std = self.vae.encode_posterior(pixels)
        mean, std = mean.float(), std.float()
        if self.config.latent == "mean":
            return self.vae.scale(mean)
        if self.config.latent == "sample":
            eps = key_noise(keys, tuple(mean.shape[1:]), self.config.seed).to(mean.device)
            return self.vae.scale(mean + std * eps)
        # mean_std: z = mean' + std' * eps with mean' = (mean - shift) * scale, std' = std * scale
        return torch.stack([self.vae.scale(mean), std * self.vae.scaling_factor], dim=1)

    def encode_arrays(self, images: np.ndarray, captions: list[str], keys: list[str]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, text states (B, ctx, D), lengths, pooled), float32 on CPU."""
        pixels = to_pixels(images).to(self.device)
        latents = self.latents(pixels, keys)
        states, lengths, pooled = self.text.encode(captions)
        return latents.float().cpu(), states.float().cpu(), self.stored_lengths(lengths).cpu(), pooled.float().cpu()

    def stored_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """States stored per caption: its real tokens, or all context_length for text_states=full."""
        if self.config.text_states == "full":
            return torch.full_like(lengths, self.text.context_length)
        return lengths

    def encode_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows with status ``ok`` get ``latent``, ``text``, ``text_length``, ``pooled``; others zeros.

        A row whose stored arrays are not finite (after the cast to the storage dtype, so fp16
        overflow counts too) is marked ``nonfinite_latent`` / ``nonfinite_text`` and left out.
        """
        status = np.array(batch["status"], dtype=object)
        n = len(status)
        dtype = self.config.dtype
        ok = np.flatnonzero(status == STATUS_OK)
        probe = tensor_to_storage(torch.zeros(1), dtype).dtype
        latent_out = np.zeros((n, *self.stored_latent_shape), dtype=probe)
        text_out = np.zeros((n, self.text.context_length, self.text.width), dtype=probe)
        pooled_out = np.zeros((n, self.text.pooled_dim), dtype=probe)
        length_out = np.zeros((n,), dtype=np.int64)
        if len(ok):
            keys = [str(k) for k in batch["key"][ok]]
            captions = [str(c) for c in batch["caption"][ok]]
            latents, states, lengths, pooled = self.encode_arrays(np.stack(batch["image"][ok]), captions, keys)
            cast = torch_dtype(dtype)
            latent_bad = ~torch.isfinite(latents.to(cast).float()).flatten(1).all(dim=1)
            text_bad = ~(torch.isfinite(states.to(cast).float()).flatten(1).all(dim=1)
                         & torch.isfinite(pooled.to(cast).float()).all(dim=1))
            latent_out[ok] = tensor_to_storage(torch.nan_to_num(latents), dtype)
            text_out[ok] = tensor_to_storage(torch.nan_to_num(states), dtype)
            pooled_out[ok] = tensor_to_storage(torch.nan_to_num(pooled), dtype)
            length_out[ok] = lengths.numpy()
            for j, row in enumerate(ok):
                if bool(latent_bad[j]) or bool(text_bad[j]):
                    status[row] = SKIP_NONFINITE_LATENT if bool(latent_bad[j]) else SKIP_NONFINITE_TEXT
                    latent_out[row], text_out[row], pooled_out[row], length_out[row] = 0, 0, 0, 0
        out = {k: v for k, v in batch.items() if k != "image" or self.config.store_pixels}
        out.update(status=status.astype(str), latent=latent_out, text=text_out, pooled=pooled_out,
                   text_length=length_out)
        return out

    def empty_caption(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(text (L, D), pooled (D,), L) of the empty caption, in the storage dtype."""
        states, lengths, pooled = self.text.encode([""])
        length = int(self.stored_lengths(lengths)[0])
        return (tensor_to_storage(states[0, :length].float(), self.config.dtype),
                tensor_to_storage(pooled[0].float(), self.config.dtype), length)

    def describe(self) -> dict[str, Any]:
        return {"vae": self.vae.describe(), "text_encoder": self.text.describe()}
