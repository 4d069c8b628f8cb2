"""Tiny randomly initialised models, saved the way real ones are, for tests and benchmarks.

Each writer uses the library's own ``save_pretrained`` / safetensors / ``torch.save`` so loading
them back goes through exactly the code path users take with real weights. The random FID
Inception weights have the real key set; FID computed with them is NOT comparable to any
published FID, it only exercises the loader, the hash check and the statistics end to end where
the real file cannot be downloaded. (The tiny CLIP checkpoint is product code, used by the demo:
``latentforge.models.text_encoder.save_tiny_clip_checkpoint``.)
"""

from __future__ import annotations

import os
from unittest import mock

import torch

from latentforge import storage


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


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of torch-fidelity's own InceptionV3 module, randomly initialised."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    torch.manual_seed(seed)
    # The library constructor always loads weights; skip that load to get a fresh module.
    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        module = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    with torch.no_grad():  # He init so activations keep their scale through the 94 conv layers
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def save_random_inception_weights(path: str, seed: int = 0) -> str:
    """Write random weights as a plain state dict (.pth like the real file); returns the sha256."""
    torch.save(random_inception_state_dict(seed), path)
    return storage.sha256_file(path)
