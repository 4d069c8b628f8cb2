"""A real (tiny, randomly initialised) train export for generation/evaluation tests.

    EXPORT/{unet/, scheduler/, data_manifest.json, manifest.json}   (docs/architecture.md)

The UNet is a diffusers `UNet2DConditionModel` saved with `save_pretrained`, the noise schedule a
`DDPMScheduler` saved with `save_pretrained`, the data manifest names the tiny open_clip checkpoint
and a "patchify" or tiny AutoencoderKL VAE, so `load_export` goes through the user's code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentforge.manifest import Manifest, write_manifest
from latentforge import storage


def tiny_unet(in_channels: int, cross_attention_dim: int = 32, sample_size: int = 8, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,
    )
    # Random init leaves the output convs near zero; make every weight matter for the tests.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


@dataclass
class TinyExport:
    dir: Path
    clip_path: str
    vae_record: dict
    resolution: int


def build_tiny_export(root: str | Path, vae: str = "patchify", resolution: int = 16, seed: int = 0,
                      prediction_type: str = "epsilon", mlflow_run_id: str | None = None,
                      clip_path: str | None = None, text_states: str | None = None) -> TinyExport:
    """`text_states` is recorded in the data manifest (None: not recorded, as before the choice existed)."""
    from diffusers import DDPMScheduler

    from latentforge.models.text_encoder import save_tiny_clip_checkpoint
    from tests.harness.tiny_models import save_tiny_autoencoder_kl, save_tiny_autoencoder_tiny

    root = Path(root)
    export = root / "export"
    export.mkdir(parents=True, exist_ok=True)
    clip = clip_path or save_tiny_clip_checkpoint(root / "clip" / "tiny.safetensors", seed=seed)
    if vae == "patchify":
        vae_record = {"type": "patchify", "id": "", "patch_size": 2, "scaling_factor": 1.0, "shift_factor": 0.0,
                      "latent_channels": 12, "downsample": 2}
    elif vae == "autoencoder_kl":
        vae_dir = save_tiny_autoencoder_kl(root / "vae", seed=seed, scaling_factor=0.5, shift_factor=None)
        vae_record = {"type": "autoencoder_kl", "id": str(vae_dir), "patch_size": 2, "scaling_factor": 0.5,
                      "shift_factor": 0.0, "latent_channels": 4, "downsample": 2}
    elif vae == "autoencoder_tiny":
        vae_dir = save_tiny_autoencoder_tiny(root / "vae", seed=seed)
        vae_record = {"type": "autoencoder_tiny", "id": str(vae_dir), "patch_size": 2, "scaling_factor": 1.0,
                      "shift_factor": 0.0, "latent_channels": 4, "downsample": 2}
    else:
        raise ValueError(vae)
    down = vae_record["downsample"]
    tiny_unet(vae_record["latent_channels"], 32, resolution // down, seed).save_pretrained(str(export / "unet"))
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type=prediction_type).save_pretrained(str(export / "scheduler"))
    data_manifest = Manifest(
        stage="precompute", config={"synthetic": True},
        models={"vae": vae_record,
                "text_encoder": {"name": "lf-tiny-clip", "weights": clip, "layer": "last",
                                 "context_length": 77, "width": 32, "pooled_dim": 32}},
        extra={"dtype": "fp32", "latent": "mean", "resolution": resolution,
               "latent_shape": [vae_record["latent_channels"], resolution // down, resolution // down],
               **({"text_states": text_states} if text_states else {})},
    )
    storage.atomic_write_json(str(export / "data_manifest.json"), data_manifest.to_dict())
    data_sha256 = storage.sha256_file(str(export / "data_manifest.json"))
    write_manifest(str(export), Manifest(stage="train", config={"preset": "test"},
                                         inputs=[{"uri": str(root / "latents" / "manifest.json"),
                                                  "sha256": data_sha256, "kind": "manifest"}],
                                         extra={"mlflow_run_id": mlflow_run_id, "step": 7,
                                                "data_dir": str(root / "latents")}))
    return TinyExport(export, clip, vae_record, resolution)
