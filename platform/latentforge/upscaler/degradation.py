"""Low-res inputs made from the high-res image of the same sample, deterministic per (seed, key, epoch).

    high-res uint8 (R, R, 3) -> [blur, sigma ~ U(0, blur)] -> downsample by `factor` (PIL bicubic,
    antialiased) -> [JPEG, quality ~ U{jpeg, 95}] -> uint8 (R/f, R/f, 3)

The random draws come from a generator seeded by sha256(seed, key, epoch): a resumed run (or another
rank, or a rerun) sees exactly the same pair for a sample in an epoch, while every epoch gets a fresh
degradation. `lowres_pixels` then makes the UNet's image input: [-1, 1], resized (bicubic) to the
latent's spatial size, the layout diffusers' StableDiffusionUpscalePipeline concatenates.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from latentforge.pixels import to_pixels

MAX_JPEG_QUALITY = 95


@dataclass(frozen=True)
class Degradation:
    """How a high-res image becomes its low-res input."""

    factor: int
    """Downsampling factor (high-res side / low-res side)."""
    blur: float = 0.0
    """Largest Gaussian blur sigma (high-res pixels) drawn before downsampling; 0 = no blur."""
    jpeg: int = 0
    """Lowest JPEG quality drawn (up to 95) for re-encoding the low-res image; 0 = no JPEG."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.factor < 2:
            raise ValueError(f"lowres factor must be >= 2, got {self.factor}")
        if self.blur < 0:
            raise ValueError(f"lowres blur must be >= 0, got {self.blur}")
        if not (self.jpeg == 0 or 1 <= self.jpeg <= MAX_JPEG_QUALITY):
            raise ValueError(f"lowres jpeg quality must be 0 (off) or in [1, {MAX_JPEG_QUALITY}], got {self.jpeg}")

    def rng(self, key: str, epoch: int) -> np.random.Generator:
        digest = hashlib.sha256(f"{self.seed}:{key}:{epoch}:lowres".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def apply(self, image: np.ndarray, key: str, epoch: int) -> np.ndarray:
        """uint8 (R, R, 3) -> uint8 (R/f, R/f, 3) for this sample and epoch."""
        height, width = image.shape[:2]
        if height % self.factor or width % self.factor:
            raise ValueError(f"image {height}x{width} is not divisible by the lowres factor {self.factor}")
        rng = self.rng(key, epoch)
        sigma, quality = float(rng.uniform(0, self.blur)), int(rng.integers(self.jpeg or 1, MAX_JPEG_QUALITY + 1))
        pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
        if self.blur > 0:
            pil = pil.filter(ImageFilter.GaussianBlur(sigma))
        pil = downsample(pil, self.factor)
        if self.jpeg:
            buffer = io.BytesIO()
            pil.save(buffer, format="JPEG", quality=quality)
            pil = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return np.asarray(pil, dtype=np.uint8)


def downsample(image: Image.Image, factor: int) -> Image.Image:
    """PIL bicubic (antialiased) to 1/factor of the size; the plain case of `Degradation.apply`."""
    return image.resize((image.width // factor, image.height // factor), Image.Resampling.BICUBIC)


def lowres_pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (B, h, w, 3) -> float32 (B, 3, size, size) in [-1, 1]: the UNet's image input."""
    pixels = to_pixels(images)
    if pixels.shape[-1] != size or pixels.shape[-2] != size:
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
    return pixels.clamp(-1, 1)


def bicubic_upsample(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, h, w, 3) -> uint8 (B, size, size, 3), PIL bicubic: the baseline an upscaler must beat."""
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC)) for a in images])
