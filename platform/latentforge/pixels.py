"""The one convention for pixels: uint8 images <-> float tensors in [-1, 1] (what VAEs take and give).

`x / 127.5 - 1` on the way in and `round((x + 1) * 127.5)` on the way out, so a uint8 image survives
a round trip exactly. Precompute, the autoencoder stage, the samplers' img2img input, the eval set
and the metrics all convert through here.
"""

from __future__ import annotations

import numpy as np
import torch


def to_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] (``x / 127.5 - 1``)."""
    tensor = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True))
    return tensor.permute(0, 3, 1, 2).to(torch.float32).div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (B, 3, H, W) -> uint8 (B, 3, H, W), rounding like PIL export does."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
