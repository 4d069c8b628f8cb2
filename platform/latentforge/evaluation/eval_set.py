"""Reading an evaluation set: precompute latent shards (captions + latents) or ingest image shards.

Only shards listed in the manifest are read, in name order, samples in tar order, so "the first N
samples" is the same set on every run and machine (the reference statistics cache relies on it).

Real images for FID:
- ingest shards: the stored image, resized (shorter side, bicubic) and centre-cropped to the
  generation resolution;
- latent shards with stored pixels (precompute `--store-pixels`): the stored image, PIL-bicubic
  resized to the generation resolution (how a cascade gets a reference at every stage's size);
- other latent shards: the stored latents decoded with the eval set's own VAE (posterior mean for
  `mean_std`), i.e. VAE reconstructions — FID then measures the diffusion model, not the VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from latentforge import formats, storage, tar_samples
from latentforge.manifest import MANIFEST_NAME, Manifest, read_manifest
from latentforge.pixels import to_pixels
from latentforge.precompute.preprocess import preprocess_image


@dataclass
class EvalSample:
    key: str
    caption: str
    latent: np.ndarray | None = None
    image_bytes: bytes | None = None
    pixels: np.ndarray | None = None
    """The stored preprocessed image, uint8 (R, R, 3), of a latent set made with --store-pixels."""


@dataclass
class EvalSet:
    uri: str
    manifest: Manifest
    manifest_sha256: str

    @property
    def kind(self) -> str:
        return "latents" if self.manifest.stage == "precompute" else "images"

    @property
    def pixels_size(self) -> int | None:
        """Side of the stored pixels (precompute --store-pixels), None when there are none."""
        size = (self.manifest.extra.get("pixels") or {}).get("size") if self.kind == "latents" else None
        return int(size[0]) if size else None

    @property
    def reference_kind(self) -> str:
        if self.pixels_size:
            return "stored pixels (PIL bicubic resize)"
        if self.kind == "latents":
            return "vae-decoded latents"
        return "ingested images (resize shorter side + centre crop)"


def open_eval_set(uri: str) -> EvalSet:
    manifest = read_manifest(uri)
    if manifest.stage not in ("precompute", "ingest"):
        raise ValueError(f"{uri}: an eval set is precompute (latent) or ingest (image) output, not {manifest.stage!r}")
    return EvalSet(uri, manifest, storage.sha256_file(storage.join(uri, MANIFEST_NAME)))


def iter_samples(eval_set: EvalSet, limit: int | None = None) -> Iterator[EvalSample]:
    """Samples in shard-name then tar order; stops after `limit`."""
    count = 0
    dtype = eval_set.manifest.extra.get("dtype", "fp32")
    for shard in eval_set.manifest.shards:
        for key, parts in tar_samples.iter_shard(storage.join(eval_set.uri, f"{shard.name}.tar")):
            caption = parts.get("txt", b"").decode("utf-8")
            if eval_set.kind == "latents":
                if "latent.npy" not in parts:
                    continue
                latent = formats.storage_to_tensor(formats.decode_npy(parts["latent.npy"]), dtype).float().numpy()
                if latent.ndim == 4:  # mean_std: [mean, std] -> mean
                    latent = latent[0]
                pixels = formats.decode_npy(parts[formats.PIXELS_MEMBER]) if formats.PIXELS_MEMBER in parts else None
                sample = EvalSample(key, caption, latent=latent, pixels=pixels)
            else:
                image = next((parts[s] for s in formats.IMAGE_EXTENSIONS if s in parts), None)
                if image is None:
                    continue
                sample = EvalSample(key, caption, image_bytes=image)
            yield sample
            count += 1
            if limit is not None and count >= limit:
                return


def first_samples(eval_set: EvalSet, num_samples: int) -> list[EvalSample]:
    """The first `num_samples` samples (the same on every run); ValueError when there are none."""
    samples = list(iter_samples(eval_set, num_samples))
    if not samples:
        raise ValueError(f"{eval_set.uri}: no samples to evaluate")
    return samples


def load_image(data: bytes, size: int) -> torch.Tensor:
    """Image bytes -> (3, size, size) in [-1, 1]: precompute's resize (shorter side, bicubic) and centre crop."""
    image, _ = preprocess_image(data, size)
    return to_pixels(image[None])[0]


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, h, w, 3) -> uint8 (B, size, size, 3) with PIL bicubic (antialiased when shrinking)."""
    from latentforge.upscaler.degradation import bicubic_upsample

    return images if images.shape[1:3] == (size, size) else bicubic_upsample(images, size)


def real_image_batches(eval_set: EvalSet, samples: list[EvalSample], size: int, batch_size: int,
                       device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """[-1, 1] image batches (B, 3, size, size) of the given samples (see module doc)."""
    if eval_set.pixels_size:
        for start in range(0, len(samples), batch_size):
            yield to_pixels(resize_images(np.stack([s.pixels for s in samples[start:start + batch_size]]), size))
        return
    vae: Any = None
    if eval_set.kind == "latents":
        from latentforge.models.vae import load_vae_from_manifest

        vae = load_vae_from_manifest(eval_set.manifest, device=device)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        if vae is not None:
            latents = torch.from_numpy(np.stack([s.latent for s in chunk]))
            pixels = vae.decode(latents).float().cpu()
            if pixels.shape[-1] != size or pixels.shape[-2] != size:
                pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic",
                                                         align_corners=False, antialias=True).clamp(-1, 1)
            yield pixels
        else:
            yield torch.stack([load_image(s.image_bytes or b"", size) for s in chunk])
