"""Randomly initialised FID Inception weights with the real key set, for tests and offline demos.

FID computed with these is NOT comparable to any published FID; it only exercises the loader,
the hash check and the statistics end to end where the real file cannot be downloaded.
"""

from __future__ import annotations

from unittest import mock

import torch

from latentforge import storage


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
