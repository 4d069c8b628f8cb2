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
        self.latent_shape = self.latent_shape_at(config.resolution)
        # image column -> latent column, per resolution: one pair today, one per size with --resolutions
        self.columns = {config.column("image", r): (config.column("latent", r), r) for r in config.sizes}
        self.pixel_columns = {config.column("image", r) for r in config.sizes if config.stores_pixels_at(r)}

    def latent_shape_at(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.vae.downsample
        return (self.vae.latent_channels, side, side)

    def stored_shape_at(self, resolution: int) -> tuple[int, ...]:
        shape = self.latent_shape_at(resolution)
        return (2, *shape) if self.config.latent == "mean_std" else shape

    @property
    def stored_latent_shape(self) -> tuple[int, ...]:
        return self.stored_shape_at(self.config.resolution)

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

    def image_latents(self, images: np.ndarray, keys: list[str]) -> torch.Tensor:
        """Latents of uint8 images (B, R, R, 3), float32 on CPU."""
        return self.latents(to_pixels(images).to(self.device), keys).float().cpu()

    def text_arrays(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text states (B, ctx, D), stored lengths, pooled), float32 on CPU."""
        states, lengths, pooled = self.text.encode(captions)
        return states.float().cpu(), self.stored_lengths(lengths).cpu(), pooled.float().cpu()

    def encode_arrays(self, images: np.ndarray, captions: list[str], keys: list[str]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, text states (B, ctx, D), lengths, pooled), float32 on CPU."""
        return (self.image_latents(images, keys), *self.text_arrays(captions))

    def stored_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """States stored per caption: its real tokens, or all context_length for text_states=full."""
        if self.config.text_states == "full":
            return torch.full_like(lengths, self.text.context_length)
        return lengths

    def encode_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows with status ``ok`` get ``latent`` (one ``latent_R`` per size with --resolutions), ``text``,
        ``text_length``, ``pooled``; others zeros. Each caption is encoded once, whatever the sizes.

        A row whose stored arrays are not finite (after the cast to the storage dtype, so fp16
        overflow counts too) is marked ``nonfinite_latent`` / ``nonfinite_text`` and left out, at every size.
        """
        status = np.array(batch["status"], dtype=object)
        n = len(status)
        ok = np.flatnonzero(status == STATUS_OK)
        storage_dtype = tensor_to_storage(torch.zeros(1), self.config.dtype).dtype
        outputs = {latent: np.zeros((n, *self.stored_shape_at(r)), dtype=storage_dtype)
                   for latent, r in self.columns.values()}
        outputs.update(text=np.zeros((n, self.text.context_length, self.text.width), dtype=storage_dtype),
                       pooled=np.zeros((n, self.text.pooled_dim), dtype=storage_dtype),
                       text_length=np.zeros((n,), dtype=np.int64))
        if len(ok):
            self._encode_ok(batch, ok, status, outputs)
        # images travel on to the writer only where it stores them (--store-pixels)
        out = {k: v for k, v in batch.items() if k not in self.columns or k in self.pixel_columns}
        out.update(status=status.astype(str), **outputs)
        return out

    def _encode_ok(self, batch: dict[str, np.ndarray], ok: np.ndarray, status: np.ndarray,
                   outputs: dict[str, np.ndarray]) -> None:
        keys = [str(k) for k in batch["key"][ok]]
        cast = torch_dtype(self.config.dtype)
        latents = {latent: self.image_latents(np.stack(batch[image][ok]), keys)
                   for image, (latent, _) in self.columns.items()}
        states, lengths, pooled = self.text_arrays([str(c) for c in batch["caption"][ok]])
        latent_bad = torch.zeros(len(ok), dtype=torch.bool)
        for values in latents.values():
            latent_bad |= ~torch.isfinite(values.to(cast).float()).flatten(1).all(dim=1)
        text_bad = ~(torch.isfinite(states.to(cast).float()).flatten(1).all(dim=1)
                     & torch.isfinite(pooled.to(cast).float()).all(dim=1))
        for name, values in (*latents.items(), ("text", states), ("pooled", pooled)):
            outputs[name][ok] = tensor_to_storage(torch.nan_to_num(values), self.config.dtype)
        outputs["text_length"][ok] = lengths.numpy()
        for j, row in enumerate(ok):
            if bool(latent_bad[j]) or bool(text_bad[j]):
                status[row] = SKIP_NONFINITE_LATENT if bool(latent_bad[j]) else SKIP_NONFINITE_TEXT
                for name in outputs:
                    outputs[name][row] = 0

    def empty_caption(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(text (L, D), pooled (D,), L) of the empty caption, in the storage dtype."""
        states, lengths, pooled = self.text.encode([""])
        length = int(self.stored_lengths(lengths)[0])
        return (tensor_to_storage(states[0, :length].float(), self.config.dtype),
                tensor_to_storage(pooled[0].float(), self.config.dtype), length)

    def describe(self) -> dict[str, Any]:
        return {"vae": self.vae.describe(), "text_encoder": self.text.describe()}
