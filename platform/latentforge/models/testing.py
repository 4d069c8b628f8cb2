"""Tiny randomly initialised encoders, saved the way real ones are, for tests and the demo.

Each writer uses the library's own ``save_pretrained`` / safetensors so loading them back goes
through exactly the code path users take with real weights.
"""

from __future__ import annotations

import os

import torch

from latentforge.models.text_encoder import TINY_CLIP_NAME, save_tiny_clip_checkpoint

__all__ = ["TINY_CLIP_NAME", "save_tiny_autoencoder_kl", "save_tiny_autoencoder_tiny", "save_tiny_clip_checkpoint"]


def save_tiny_autoencoder_kl(directory: str | os.PathLike, seed: int = 0, scaling_factor: float = 0.5,
                             shift_factor: float | None = 0.1) -> str:
    """A 2-level diffusers ``AutoencoderKL`` (downsample 2, 4 latent channels), ``save_pretrained``.

    Non-trivial scaling and shift factors so tests catch a factor applied twice or not at all.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
    )
    model.save_pretrained(str(directory), safe_serialization=True)
    return str(directory)


def save_tiny_autoencoder_tiny(directory: str | os.PathLike, seed: int = 0) -> str:
    """A 2-level diffusers ``AutoencoderTiny`` (downsample 2, 4 latent channels), ``save_pretrained``."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(
        in_channels=3, out_channels=3,
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4,
        upsampling_scaling_factor=2,
    )
    model.save_pretrained(str(directory), safe_serialization=True)
    return str(directory)
