"""Prompt adherence for the demo's scenes: does a generated image show what its caption asks for?

Two checks per image, pure numpy on RGB pixels (no learned classifier, so the number means
the same thing before and after training):
- the image is first averaged over blocks (`grid` x `grid` cells, 8 x 8 by default): the
  measurement is about what a person sees at a glance, so pixel-level sampling noise averages
  out (to a grey that is no palette colour) while a coloured shape keeps its colour;
- colour: every cell is labelled with the nearest palette colour, the background, or
  "other" (too far from all of them); the requested colour must be the most frequent palette
  colour and cover at least `min_fraction` of the cells;
- position: the centroid of the requested colour's pixels must lie in the half the caption
  names (left/right/top/bottom).
A model that draws a random palette colour scores about 1/len(COLOURS) on colour by chance;
pure noise scores about 0.
Each share comes with its 95 % Wilson score interval (`wilson_interval`): on a few dozen images one
image moves a share by 2 points, so a figure means little without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
from PIL import Image

from latentforge.demo.scenes import BACKGROUND, COLOURS, parse_caption

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES] + [BACKGROUND], dtype=np.float32)
BACKGROUND_LABEL = len(_NAMES)
OTHER_LABEL = len(_NAMES) + 1


def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {array.shape}")
    return array.astype(np.float32)


def block_average(image: Any, grid: int | None = 8) -> np.ndarray:
    """(grid, grid, 3) mean colours of a grid of equal blocks (None or a larger grid: unchanged)."""
    pixels = _as_array(image)
    h, w = pixels.shape[:2]
    if not grid or grid >= min(h, w):
        return pixels
    ys = np.linspace(0, h, grid + 1).astype(int)
    xs = np.linspace(0, w, grid + 1).astype(int)
    return np.array([[pixels[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean(axis=(0, 1)) for j in range(grid)]
                     for i in range(grid)], dtype=np.float32)


def classify_pixels(image: Any, max_distance: float = 100.0) -> np.ndarray:
    """(H, W) labels: palette index (COLOURS order), BACKGROUND_LABEL or OTHER_LABEL."""
    pixels = _as_array(image)
    dist = np.linalg.norm(pixels[..., None, :] - _PALETTE, axis=-1)  # (H, W, K+1)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > max_distance] = OTHER_LABEL
    return labels


def image_adherence(image: Any, caption: str, min_fraction: float = 0.03,
                    max_distance: float = 100.0, grid: int | None = 8) -> dict[str, Any]:
    """{colour_ok, position_ok, dominant} for one image and the caption it was generated from."""
    colour, _shape, position = parse_caption(caption)
    labels = classify_pixels(block_average(image, grid), max_distance)
    counts = np.bincount(labels.ravel(), minlength=OTHER_LABEL + 1)[: len(_NAMES)]
    least = min_fraction * labels.size
    dominant = _NAMES[int(counts.argmax())] if counts.max() >= least else None
    wanted = labels == _NAMES.index(colour)
    position_ok = False
    if position is not None and wanted.sum() >= least:
        ys, xs = np.nonzero(wanted)
        cx, cy = (xs.mean() + 0.5) / labels.shape[1], (ys.mean() + 0.5) / labels.shape[0]
        position_ok = bool({"left": cx < 0.5, "right": cx > 0.5, "top": cy < 0.5, "bottom": cy > 0.5}[position])
    return {"colour_ok": dominant == colour, "position_ok": position_ok, "dominant": dominant}


SHAPE_FILL = {"triangle": 0.5, "circle": float(np.pi / 4), "square": 1.0}
"""Area / bounding-box area of each shape (the demo's renders measure 0.52-0.57, 0.75-0.81 and 1.0)."""


def image_shape(image: Any, max_distance: float = 60.0, min_pixels: int = 8) -> str | None:
    """The shape of the largest blob of pixels farther than `max_distance` from the background: the one
    whose fill of its bounding box is nearest; None when no blob has `min_pixels` pixels."""
    from scipy import ndimage

    pixels = _as_array(image)
    blobs, count = ndimage.label(np.linalg.norm(pixels - np.array(BACKGROUND), axis=-1) > max_distance)
    sizes = np.bincount(blobs.ravel())[1:]
    if not count or sizes.max() < min_pixels:
        return None
    ys, xs = np.nonzero(blobs == 1 + int(sizes.argmax()))
    fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return min(SHAPE_FILL, key=lambda shape: abs(SHAPE_FILL[shape] - fill))


Z_95 = 1.959964
"""The standard normal quantile of a two-sided 95 % interval."""


def wilson_interval(share: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a share measured on `n` images.

    Wilson rather than share +- z * standard error: it stays inside [0, 1] and keeps its coverage near
    0 % and 100 %, where the demo's figures sit. n = 0 gives (0, 1): nothing is known.
    """
    if n <= 0:
        return 0.0, 1.0
    z2n = z * z / n
    centre = (share + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(share * (1 - share) / n + z2n / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def format_share(share: float, n: int) -> str:
    """`88% [84, 91]`: a share with its 95 % Wilson interval in percentage points."""
    low, high = wilson_interval(share, n)
    return f"{share:.0%} [{low * 100:.0f}, {high * 100:.0f}]"


@dataclass
class AdherenceResult:
    """Shares of images (0..1) that follow their prompt."""

    n: int
    colour: float
    """The requested colour dominates."""
    position: float
    """The requested colour sits where the caption says."""
    both: float
    chance_colour: float = 1.0 / len(COLOURS)

    def as_metrics(self, prefix: str = "adherence") -> dict[str, float]:
        return {f"{prefix}_{k}": float(v) for k, v in asdict(self).items() if k not in ("chance_colour",)}

    def describe(self) -> str:
        shares = ", ".join(f"{what} {format_share(getattr(self, what), self.n)}"
                           for what in ("colour", "position", "both"))
        return f"{shares} of {self.n} images (95 % intervals)"


def score_images(pairs: Iterable[tuple[Any, str]], **kwargs: Any) -> AdherenceResult:
    """Adherence over (image, caption) pairs; images are PIL images or (H, W, 3) arrays."""
    rows = [image_adherence(image, caption, **kwargs) for image, caption in pairs]
    if not rows:
        return AdherenceResult(0, 0.0, 0.0, 0.0)
    colour = np.mean([r["colour_ok"] for r in rows])
    position = np.mean([r["position_ok"] for r in rows])
    both = np.mean([r["colour_ok"] and r["position_ok"] for r in rows])
    return AdherenceResult(len(rows), float(colour), float(position), float(both))
