"""The autoencoder stage's output: STORAGE/RUN_NAME/export/, an ordinary diffusers AutoencoderKL directory.

    config.json                          AutoencoderKL config; `scaling_factor` measured on the data
    diffusion_pytorch_model.safetensors  the weights (`save_pretrained`)
    manifest.json                        Manifest(stage="autoencoder"): config, input digest, metrics

Precompute takes the directory as `--vae EXPORT --vae-type autoencoder_kl`. The scaling factor
follows Stable Diffusion's rule: 1 / std of posterior samples of the latents of a sample of the
training images, so the latents the UNet sees have unit variance. manifest.json is removed first
and written last, so a reader never trusts a half-written export.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import torch

from latentforge import storage
from latentforge.manifest import MANIFEST_NAME, Manifest, manifest_uri, write_manifest
from latentforge.pixels import to_pixels


@torch.no_grad()
def measure_scaling_factor(vae: Any, images: np.ndarray, seed: int, batch_size: int = 32) -> tuple[float, float]:
    """(1 / std, std) of posterior samples z ~ q(z|x) (less the model's shift) over uint8 images (N, H, W, 3)."""
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    was_training = vae.training
    vae.eval()
    latents = []
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start:start + batch_size]).to(device)
        latents.append((vae.encode(pixels).latent_dist.sample(generator).float() - shift).flatten().cpu())
    vae.train(was_training)
    std = float(torch.cat(latents).std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"the latents of {len(images)} images have std {std}; cannot set a scaling factor")
    return 1.0 / std, std


def describe_autoencoder(vae: Any, scaling_factor: float) -> dict[str, Any]:
    """The manifest's models.vae record, in the shape precompute writes for the VAE it loads."""
    config = vae.config
    return {"type": "autoencoder_kl", "class": "AutoencoderKL", "scaling_factor": scaling_factor,
            "shift_factor": float(getattr(config, "shift_factor", None) or 0.0),
            "latent_channels": int(config.latent_channels),
            "downsample": 2 ** (len(config.block_out_channels) - 1),
            "block_out_channels": list(config.block_out_channels),
            "parameters": int(sum(p.numel() for p in vae.parameters()))}


def write_autoencoder_export(export_uri: str, vae: Any, scaling_factor: float, *, config: dict[str, Any],
                             data_dir: str, data_digest: str, step: int, mlflow_run_id: str | None,
                             counts: dict[str, int] | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write the export (a CPU float32 copy of `vae` with the measured scaling factor); returns the manifest's sha256."""
    from diffusers import AutoencoderKL

    fs, root = storage.filesystem(export_uri)
    if fs.exists(f"{root}/{MANIFEST_NAME}"):
        fs.rm(f"{root}/{MANIFEST_NAME}")
    exported = AutoencoderKL.from_config(vae.config)
    # Not a from_config override: diffusers would reset a field the source left at its default.
    exported.register_to_config(scaling_factor=float(scaling_factor))
    exported.load_state_dict({k: v.detach().float().cpu() for k, v in vae.state_dict().items()})
    with tempfile.TemporaryDirectory(prefix="lf-ae-export-") as tmp:
        exported.save_pretrained(tmp, safe_serialization=True)
        fs.makedirs(root, exist_ok=True)
        fs.put(f"{tmp}/", root, recursive=True)
    manifest = Manifest(
        stage="autoencoder", config=config,
        inputs=[{"uri": manifest_uri(data_dir), "sha256": data_digest, "kind": "manifest"}],
        counts=dict(counts or {}), models={"vae": describe_autoencoder(exported, scaling_factor)},
        extra={"mlflow_run_id": mlflow_run_id, "step": int(step), "data_dir": data_dir,
               "use_with": "precompute --vae EXPORT_DIR --vae-type autoencoder_kl", **(extra or {})})
    return write_manifest(export_uri, manifest)
