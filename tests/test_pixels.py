"""One pixel convention: every stage converts uint8 <-> [-1, 1] and resizes + centre-crops the same way."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from latentforge.evaluation.eval_set import load_image
from latentforge.pixels import to_pixels, to_uint8
from latentforge.precompute.preprocess import preprocess_image


def test_uint8_round_trip_is_exact() -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    pixels = to_pixels(images)  # (B, 3, H, W)
    assert pixels.shape == (2, 3, 5, 7) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(to_uint8(pixels), torch.from_numpy(images).permute(0, 3, 1, 2))


def test_eval_images_are_precomputes_resize_and_centre_crop() -> None:
    # A wide image: the eval set and precompute must pick the same 16x16 window from it.
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 61, 3), dtype=np.uint8)).save(buf, format="PNG")
    stored, _ = preprocess_image(buf.getvalue(), 16)
    assert torch.equal(load_image(buf.getvalue(), 16), to_pixels(stored[None])[0])
