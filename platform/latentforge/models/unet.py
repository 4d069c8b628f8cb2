"""Denoising UNets for latent diffusion: named presets or a diffusers config file.

    build_unet("tiny", in_channels=4, cross_attention_dim=64)       # ~0.8 M params, CPU tests
    build_unet("tiny-pooled", 4, 32)                                # tiny + pooled text in the time embedding
    build_unet("sd15", 4, 768)                                      # Stable Diffusion 1.5 shape
    build_unet("sd2-base", 4, 1024)                                 # Stable Diffusion 2 (base) shape
    build_unet("path/to/unet/config.json", 4, 1024)                 # any UNet2DConditionModel config

`tiny` and `tiny-pooled` adapt to the data (its channels and cross-attention width come from the latent
manifest). `sd15` / `sd2-base` and config files have fixed shapes, so a mismatch with the data
is a clear `UNetConfigError` rather than a shape error deep inside the first forward pass.
`resolve_unet_config` does all the checking without building weights, so the train driver can
refuse a bad run before any Ray worker starts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

_SD_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
}

# ~0.8 M parameters at cross_attention_dim 64: two resolutions, attention at the top one.
_TINY = {
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "sample_size": 8,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    # `tiny` + the text states attention-pooled into the time embedding (diffusers' addition_embed_type
    # "text"), so every ResNet block, not only the cross-attention layers, sees the whole caption: a global
    # signal for where the object goes (~1 % more compute; the demo's position adherence, jobs/configs/demo).
    # 4 pooling heads divide every text width in use (32, 64, 512, 768, 1024).
    "tiny-pooled": {**_TINY, "addition_embed_type": "text", "addition_embed_type_num_heads": 4},
    # runwayml/stable-diffusion-v1-5 unet/config.json (860 M parameters).
    "sd15": {**_SD_BLOCKS, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 768,
             "attention_head_dim": 8, "sample_size": 64},
    # stabilityai/stable-diffusion-2-base unet/config.json (865 M parameters).
    "sd2-base": {**_SD_BLOCKS, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 1024,
                 "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
                 "upcast_attention": False, "sample_size": 64},
}
ADAPTIVE_PRESETS = ("tiny", "tiny-pooled")
"""Presets whose channels / cross-attention width are taken from the data."""


class UNetConfigError(ValueError):
    """The UNet preset/config is unknown, malformed or does not fit the latent data."""


def _load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise UNetConfigError(f"unknown UNet preset or missing config file {path!r}; presets: {sorted(PRESETS)}")
    try:
        data = json.loads(p.read_text())
    except ValueError as exc:
        raise UNetConfigError(f"{p}: not a JSON UNet config ({exc})") from exc
    if not isinstance(data, dict):
        raise UNetConfigError(f"{p}: a UNet config must be a JSON object")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def resolve_unet_config(preset_or_config_path: str, in_channels: int, cross_attention_dim: int,
                        sample_size: int | None = None, image_channels: int = 0) -> dict[str, Any]:
    """The `UNet2DConditionModel` config for a preset or file, checked against the data.

    in_channels: latent channels of the data (manifest `models.vae.latent_channels`).
    cross_attention_dim: width of the text states (manifest `models.text_encoder.width`).
    sample_size: latent side length, recorded in the config (pipelines use it as default size).
    image_channels: channels concatenated to the latents at the input (an upscaler's low-res image),
    so the UNet takes in_channels + image_channels and predicts in_channels.
    """
    name = str(preset_or_config_path)
    if name in PRESETS:
        config = copy.deepcopy(PRESETS[name])
        source = f"preset {name!r}"
        if name in ADAPTIVE_PRESETS:
            config.update(in_channels=in_channels + image_channels, out_channels=in_channels,
                          cross_attention_dim=cross_attention_dim)
    else:
        config = _load_config_file(name)
        source = f"config file {name!r}"
    problems = []
    if config.get("in_channels", 4) != in_channels + image_channels:
        problems.append(f"in_channels {config.get('in_channels', 4)} but the latents have {in_channels} channels"
                        + (f" (+ {image_channels} image channels)" if image_channels else ""))
    if config.get("out_channels", 4) != in_channels:
        problems.append(f"out_channels {config.get('out_channels', 4)} but the latents have {in_channels} channels")
    if config.get("cross_attention_dim", 1280) != cross_attention_dim:
        problems.append(f"cross_attention_dim {config.get('cross_attention_dim', 1280)} but the text states are "
                        f"{cross_attention_dim} wide")
    heads = config.get("addition_embed_type_num_heads", 64)
    if config.get("addition_embed_type") == "text" and cross_attention_dim % heads:
        problems.append(f"the text states are {cross_attention_dim} wide, which its {heads} text-pooling heads "
                        f"(addition_embed_type_num_heads) do not divide")
    if problems:
        hint = (" (the 'tiny' preset adapts to any data; for sd15 use a 768-wide text encoder, for sd2-base a "
                "1024-wide one, both with 4-channel latents)")
        raise UNetConfigError(f"UNet {source} does not fit the data: {'; '.join(problems)}{hint}")
    if sample_size is not None:
        config["sample_size"] = int(sample_size)
    return config


def check_latent_size(config: Mapping[str, Any], height: int, width: int) -> None:
    """Each down block but the last halves the resolution: sides must divide by 2**(blocks-1)."""
    factor = 2 ** (len(config.get("down_block_types", [])) - 1)
    if height % factor or width % factor:
        raise UNetConfigError(f"latent size {height}x{width} is not divisible by {factor}, which this UNet's "
                              f"{len(config['down_block_types'])} down blocks need")


def unet_from_config(config: Mapping[str, Any]):
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_config(dict(config))
    except (TypeError, ValueError) as exc:
        raise UNetConfigError(f"invalid UNet2DConditionModel config: {exc}") from exc


def build_unet(preset_or_config_path: str, in_channels: int, cross_attention_dim: int,
               sample_size: int | None = None):
    """A randomly initialised diffusers `UNet2DConditionModel` (seed torch first for determinism)."""
    return unet_from_config(resolve_unet_config(preset_or_config_path, in_channels, cross_attention_dim, sample_size))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
