"""The one grid maker: images tiled row-major into a contact sheet, small ones enlarged for display.

Generation, evaluation and upscaling save their sample grids with it (through
`generation.outputs.save_grid`), and autoencoder training its reconstruction grids, so every grid
has the same layout: cells the size of the largest image, `pad` px gutters, a white background.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DISPLAY_TILE = 128
"""A grid shows each image at least this many pixels high or wide (or as it is when larger)."""


def display_scale(images: Sequence[np.ndarray], tile: int = DISPLAY_TILE) -> int:
    """The whole factor that brings the largest image up to about `tile` px: 16 px samples x8."""
    return max(1, tile // max(max(i.shape[:2]) for i in images))


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """Each pixel repeated `scale` x `scale` times (nearest neighbour: a 16 px sample stays 16 px
    worth of detail, not a blur, when enlarged to be looked at)."""
    return image if scale == 1 else np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def contact_sheet(images: Sequence[np.ndarray], columns: int | None = None, scale: int = 1, pad: int = 2,
                  background: int = 255) -> np.ndarray:
    """Tile (H, W, 3) uint8 images row-major, each enlarged `scale` x, into one image with `pad` px
    gutters; `columns` defaults to a near-square sheet."""
    if not images:
        raise ValueError("no images for a contact sheet")
    images = [enlarge(image, scale) for image in images]
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), background, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y:y + img.shape[0], x:x + img.shape[1]] = img
    return sheet
