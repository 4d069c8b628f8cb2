"""Chaining stages at generate time, checked from the manifests before any weights load.

    [base (txt2img)] -> upscaler 1 -> upscaler 2 ...     or     low-res images -> upscaler 1 -> ...

Each stage's input size must be the previous stage's output size, and each upscaler's UNet must
take its autoencoder's latent channels + 3 image channels; `plan_cascade` refuses a chain that breaks
either (a ConfigError: one line, exit 2). Between stages images are rounded to uint8 exactly as a PNG
stores them, so a cascade equals running its stages one after the other through PNG files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentforge.config import ConfigError
from latentforge.manifest import ManifestError, read_manifest
from latentforge.trained_model import read_data_manifest
from latentforge.upscaler.conditioning import IMAGE_CHANNELS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SKIPPED_FILES = ("grid.png",)
"""A generate output's contact sheet is not one of its images."""


@dataclass(frozen=True)
class Cascade:
    base: str | None
    """The base model's export dir (None: the inputs are given images)."""
    upscalers: list[str]
    """Upscaler export dirs, in order."""
    input_size: int
    """Side of what the first upscaler takes (the base's output or the given images)."""
    output_size: int


def upscaler_manifest_record(export_dir: str) -> dict[str, Any]:
    """`extra.upscaler` of an export plus its channel check; ConfigError when it is no usable upscaler."""
    try:
        manifest = read_manifest(export_dir, stage="train")
        data = read_data_manifest(export_dir)
    except (ManifestError, OSError) as exc:
        raise ConfigError(f"--upscaler {export_dir}: {exc}") from exc
    record = manifest.extra.get("upscaler")
    if not record:
        raise ConfigError(f"--upscaler {export_dir} is a base model, not an upscaler (jobs/train.py --stage upscaler)")
    vae_channels = int(data.models.get("vae", {}).get("latent_channels", -1))
    unet_channels = int(manifest.models.get("unet", {}).get("in_channels", -1))
    if unet_channels != vae_channels + IMAGE_CHANNELS:
        raise ConfigError(f"--upscaler {export_dir}: its autoencoder has {vae_channels} latent channels but its UNet "
                          f"takes {unet_channels} (expected {vae_channels} + {IMAGE_CHANNELS} image channels)")
    return record


def base_output_size(export_dir: str, height: int | None, width: int | None) -> int:
    resolution = int(read_data_manifest(export_dir).extra.get("resolution") or 0)
    height, width = height or resolution, width or resolution
    if height != width:
        raise ConfigError(f"a cascade needs square images; --height {height} and --width {width} differ")
    return height


def plan_cascade(base: str | None, upscalers: list[str], base_size: int | None) -> Cascade:
    """The chain, every link checked: ConfigError on the first stage whose input size does not fit."""
    records = [upscaler_manifest_record(d) for d in upscalers]
    size = base_size if base_size is not None else int(records[0]["lowres_size"])
    before = f"the base model {base} makes" if base else "the low-res input is"
    first = size
    for export_dir, record in zip(upscalers, records):
        if int(record["lowres_size"]) != size:
            raise ConfigError(f"--upscaler {export_dir} takes {record['lowres_size']}x{record['lowres_size']} px "
                              f"low-res images but {before} {size}x{size} px")
        size, before = int(record["resolution"]), f"upscaler {export_dir} makes"
    return Cascade(base, list(upscalers), first, size)


def image_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise ConfigError(f"--init-images {directory} is not a directory")
    names = sorted(n for n in os.listdir(directory)
                   if n.lower().endswith(IMAGE_SUFFIXES) and n not in SKIPPED_FILES)
    if not names:
        raise ConfigError(f"--init-images {directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [os.path.join(directory, n) for n in names]


def load_images(paths: list[str], size: int) -> np.ndarray:
    """uint8 (N, size, size, 3); ConfigError naming the first image of another size (never resized silently)."""
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        if array.shape[:2] != (size, size):
            raise ConfigError(f"--init-images: {path} is {array.shape[0]}x{array.shape[1]} px but the upscaler "
                              f"takes {size}x{size} px")
        arrays.append(array)
    return np.stack(arrays)


def upscaler_params(params: Any, steps: int | None, guidance: float | None) -> Any:
    """The super-resolution stages' `SampleParams`: the base's, with their own steps / guidance where given
    (`--upscaler-steps`, `--upscaler-guidance`)."""
    from dataclasses import replace

    return replace(params, steps=steps or params.steps, guidance=params.guidance if guidance is None else guidance)


def run_upscalers(upscalers: list[Any], images: np.ndarray, prompts: list[str], seeds: list[int], params: Any,
                  noise_level: int) -> list[list[Any]]:
    """Each upscaler on the previous stage's images, uint8 (B, h, w, 3) in; every stage's `GeneratedImage`s out.

    `params` are sized to each stage's resolution; between stages the images are rounded to uint8, what a
    PNG stores, so a chain equals its stages run one by one through files."""
    from dataclasses import replace

    stages = []
    for upscaler in upscalers:
        made = upscaler.upscale(images, prompts, seeds, replace(params, height=upscaler.resolution,
                                                                  width=upscaler.resolution), noise_level)
        stages.append(made)
        images = np.stack([m.to_uint8() for m in made])  # (B, H, W, 3)
    return stages
