"""Super-resolution fidelity on held-out pairs: the upscaler's output and PIL bicubic upsampling of the
same low-res input, both scored with torchmetrics PSNR / SSIM against the real high-res image.

    held = held_out_images(open_eval_set(URI), upscaler.resolution, limit=64)
    result = sr_fidelity(upscaler, held, SampleParams(steps=20), noise_level=0)
    print(fidelity_table(result))            # SR | bicubic | SR - bicubic
    result.metrics["sr_psnr_gain_db"]        # > 0: the upscaler beats bicubic

The low-res input of a held-out image is the upscaler's recorded degradation (`extra.upscaler`:
factor, blur, JPEG) applied by `latentforge.upscaler.degradation.Degradation`, whose draws are
seeded by (degradation seed, key): the same pairs on every run. No Ray here (the demo calls it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from latentforge.config import ConfigError
from latentforge.evaluation.eval_set import EvalSample, EvalSet, first_samples
from latentforge.precompute.preprocess import preprocess_image
from latentforge.upscaler.degradation import Degradation, bicubic_upsample

METHODS = ("sr", "bicubic")


@dataclass
class HeldOut:
    """Real high-res images and what they came with."""

    keys: list[str]
    captions: list[str]
    images: np.ndarray
    """uint8 (N, R, R, 3)."""


@dataclass
class SrFidelity:
    metrics: dict[str, float]
    """sr_psnr, sr_ssim, bicubic_psnr, bicubic_ssim, sr_psnr_gain_db, sr_num_pairs."""
    lowres_size: int
    resolution: int
    preview: list[list[np.ndarray]] = field(default_factory=list)
    """The first pairs as [low-res, bicubic, SR, real] uint8 images."""


def check_held_out(eval_set: EvalSet, resolution: int) -> None:
    """ConfigError when the eval set's manifest already says it holds no real images at `resolution`."""
    if eval_set.kind == "latents" and not eval_set.pixels_size:
        raise ConfigError(f"{eval_set.uri} holds latents without pixels: SR fidelity needs the real high-res images "
                          "(precompute with --store-pixels, or pass ingest shards)")
    if eval_set.pixels_size and eval_set.pixels_size != resolution:
        raise ConfigError(f"{eval_set.uri} stores {eval_set.pixels_size}x{eval_set.pixels_size} px images but the "
                          f"upscaler makes {resolution}x{resolution} px: give held-out data at its resolution")


def held_out_images(eval_set: EvalSet, resolution: int, limit: int) -> HeldOut:
    """The first `limit` samples' real images at the upscaler's `resolution`; ConfigError when they cannot be."""
    check_held_out(eval_set, resolution)
    samples = first_samples(eval_set, limit)
    images = np.stack([_real_image(s, resolution, eval_set.uri) for s in samples])
    return HeldOut([s.key for s in samples], [s.caption for s in samples], images)


def _real_image(sample: EvalSample, resolution: int, uri: str) -> np.ndarray:
    if sample.pixels is not None:
        return sample.pixels
    image, geometry = preprocess_image(sample.image_bytes or b"", resolution)
    height, width = geometry["decoded_size"]
    if min(height, width) < resolution:  # upsampled, it would be no real high-res image
        raise ConfigError(f"{uri}: image {sample.key} is {height}x{width} px, smaller than the upscaler's "
                          f"{resolution} px: give held-out data at its resolution")
    return image


def degradation_of(record: dict[str, Any], seed: int) -> Degradation:
    """The degradation an upscaler export records (`extra.upscaler`), with draws seeded by `seed`."""
    recipe = record.get("degradation") or {}
    return Degradation(int(record["lowres_factor"]), float(recipe.get("blur", 0.0)), int(recipe.get("jpeg", 0)), seed)


def as_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1], what torchmetrics' image metrics take."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)


def ssim_kernel(side: int) -> int:
    """SSIM's Gaussian window: 11 px, or the largest odd size up to half of a smaller image."""
    return min(11, (side // 2) * 2 - 1)


class FidelityMeter:
    """torchmetrics PSNR (over all pixels of all images) and SSIM (mean over images) of one method."""

    def __init__(self, side: int) -> None:
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=ssim_kernel(side))

    def update(self, images: np.ndarray, real: np.ndarray) -> None:
        """uint8 (B, R, R, 3) images against the real ones."""
        preds, target = as_unit(images), as_unit(real)
        self.psnr.update(preds, target)
        self.ssim.update(preds, target)

    def compute(self) -> tuple[float, float]:
        return float(self.psnr.compute()), float(self.ssim.compute())


def sr_fidelity(upscaler: Any, held: HeldOut, params: Any, noise_level: int, seed: int = 0, batch_size: int = 8,
                degradation_seed: int = 0, preview: int = 8) -> SrFidelity:
    """Score `upscaler` (a `latentforge.upscaler.sampling.Upscaler`) and bicubic on the held-out pairs.

    Pair i is upsampled with seed + i and its caption as the prompt; `params` are the sampling settings
    (sampled at the upscaler's resolution)."""
    resolution = upscaler.resolution
    if held.images.shape[1:3] != (resolution, resolution):
        raise ConfigError(f"held-out images are {held.images.shape[1]}x{held.images.shape[2]} px but the upscaler "
                          f"makes {resolution}x{resolution} px")
    params = replace(params, height=resolution, width=resolution)
    degradation = degradation_of(upscaler.record, degradation_seed)
    meters = {method: FidelityMeter(resolution) for method in METHODS}
    shown: list[list[np.ndarray]] = []
    for start in range(0, len(held.keys), batch_size):
        real = held.images[start:start + batch_size]
        low = np.stack([degradation.apply(im, key, 0) for im, key in zip(real, held.keys[start:start + batch_size])])
        seeds = [seed + start + i for i in range(len(real))]
        made = upscaler.upscale(low, held.captions[start:start + len(real)], seeds, params, noise_level)
        outputs = {"sr": np.stack([m.to_uint8() for m in made]), "bicubic": bicubic_upsample(low, resolution)}
        for method in METHODS:
            meters[method].update(outputs[method], real)
        shown += [[low[i], outputs["bicubic"][i], outputs["sr"][i], real[i]]
                  for i in range(min(len(real), preview - len(shown)))]
    return SrFidelity(_metrics(meters, len(held.keys)), resolution // degradation.factor, resolution, shown)


def _metrics(meters: dict[str, FidelityMeter], pairs: int) -> dict[str, float]:
    metrics: dict[str, float] = {"sr_num_pairs": float(pairs)}
    for method, meter in meters.items():
        metrics[f"{method}_psnr"], metrics[f"{method}_ssim"] = meter.compute()
    metrics["sr_psnr_gain_db"] = metrics["sr_psnr"] - metrics["bicubic_psnr"]
    return metrics


def fidelity_table(result: SrFidelity) -> str:
    """SR and bicubic side by side, with the difference."""
    m = result.metrics
    title = (f"SR fidelity: {int(m['sr_num_pairs'])} held-out pairs, {result.lowres_size} px -> "
             f"{result.resolution} px (PSNR / SSIM against the real image)")
    rows = [("", "SR", "bicubic", "SR - bicubic"),
            ("PSNR (dB)", f"{m['sr_psnr']:.2f}", f"{m['bicubic_psnr']:.2f}", f"{m['sr_psnr_gain_db']:+.2f}"),
            ("SSIM", f"{m['sr_ssim']:.4f}", f"{m['bicubic_ssim']:.4f}", f"{m['sr_ssim'] - m['bicubic_ssim']:+.4f}")]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    rule = "-" * max(len(title), len(lines[0]))
    return "\n".join([title, rule, *lines, rule])


def comparison_picture(result: SrFidelity) -> np.ndarray:
    """uint8 sheet, one row per pair: low-res | bicubic | SR | real, enlarged with nearest neighbour."""
    from PIL import Image

    from latentforge.generation.outputs import DISPLAY_TILE, contact_sheet

    if not result.preview:
        raise ValueError("no pairs to show")
    side = result.resolution * max(1, DISPLAY_TILE // result.resolution)  # the low-res input enlarged further
    tiles = [np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.NEAREST))
             for row in result.preview for im in row]
    return contact_sheet(tiles, columns=4)
