"""Sample captions of an eval set and score the samples: FID against the eval set's real images
(reference statistics cached under their content hash) and CLIP score against the captions."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from latentforge.evaluation.clip_score import ClipScorer, clip_score_from_embeddings
from latentforge.evaluation.eval_set import EvalSample, EvalSet, first_samples, real_image_batches
from latentforge.evaluation.fid import (RESIZE_PATH, FeatureStats, InceptionFeatures, cached_reference_stats,
                                        fid_from_stats)
from latentforge.pixels import to_uint8

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    base = os.environ.get("LATENTFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "latentforge")
    return os.path.join(base, "fid_reference")


@dataclass
class ScoreResult:
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    preview: list[np.ndarray] = field(default_factory=list)
    """The first generated images (uint8 HWC) for a contact sheet."""


class StageScores:
    """FID features and CLIP embeddings of one stage's generated images, accumulated batch by batch."""

    def __init__(self, inception: InceptionFeatures | None, clip: ClipScorer | None) -> None:
        self.inception, self.clip = inception, clip
        self.gen_stats = FeatureStats(inception.dim) if inception is not None else None
        self.img_emb: list[torch.Tensor] = []
        self.txt_emb: list[torch.Tensor] = []

    def add(self, images: list[Any], captions: list[str]) -> None:
        """Generated images (`GeneratedImage`, [0, 1] arrays) and the captions they were made from."""
        pixels = torch.stack([torch.from_numpy(im.array).permute(2, 0, 1) * 2 - 1 for im in images])  # (B, 3, H, W)
        if self.gen_stats is not None and self.inception is not None:
            self.gen_stats.update(self.inception(to_uint8(pixels)))
        if self.clip is not None:
            self.img_emb.append(self.clip.embed_images(pixels))
            self.txt_emb.append(self.clip.embed_texts(captions))

    def finish(self, eval_set: EvalSet, samples: list[EvalSample], size: int, batch_size: int,
               cache_dir: str | None) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics, info): FID against the eval set's real images at `size`, CLIP score against the captions."""
        metrics: dict[str, float] = {}
        info: dict[str, Any] = {}
        if self.inception is not None and self.gen_stats is not None:
            metrics, info = _fid(self.inception, self.gen_stats, eval_set, samples, size, batch_size, cache_dir)
        if self.clip is not None:
            value = clip_score_from_embeddings(torch.cat(self.img_emb), torch.cat(self.txt_emb))
            metrics["clip_score"] = value
            info.update(self.clip.describe(), clip_num_samples=len(samples))
            log.info("CLIP score %.4f at %d px (N=%d, %s, %s)", value, size, len(samples), self.clip.model_id,
                     self.clip.describe()["clip_score_formula"])
        return metrics, info


def _fid(inception: InceptionFeatures, gen_stats: FeatureStats, eval_set: EvalSet, samples: list[EvalSample],
         size: int, batch_size: int, cache_dir: str | None) -> tuple[dict[str, float], dict[str, Any]]:
    content = {"eval_set_manifest_sha256": eval_set.manifest_sha256, "keys": [s.key for s in samples],
               "n": len(samples), "weights_sha256": inception.weights_sha256, "resize": RESIZE_PATH,
               "resolution": size, "reference": eval_set.reference_kind}

    def compute() -> FeatureStats:
        batches = real_image_batches(eval_set, samples, size, batch_size)
        return inception.accumulate(to_uint8(batch) for batch in batches)

    ref, path, hit = cached_reference_stats(cache_dir or default_cache_dir(), content, compute)
    fid = fid_from_stats(gen_stats, ref)
    log.info("FID %.4f at %d px (N=%d generated, %d reference; %s)", fid["fid"], size, fid["fid_n"],
             fid["fid_reference_n"], "reference stats from cache" if hit else "reference stats computed and cached")
    metrics = {"fid": fid["fid"], "fid_num_samples": float(fid["fid_n"]),
               "fid_reference_num_samples": float(fid["fid_reference_n"])}
    info = {**inception.describe(), "fid_reference": eval_set.reference_kind, "fid_reference_cache": path,
            "fid_reference_cache_hit": hit}
    return metrics, info


def score_sampler(sampler: Any, eval_set: EvalSet, num_samples: int, params: Any, seed: int = 0,
                  batch_size: int = 8, inception: InceptionFeatures | None = None, clip: ClipScorer | None = None,
                  cache_dir: str | None = None, preview: int = 16) -> ScoreResult:
    """Generate one image per caption of the first `num_samples` eval samples (seed + i) and score them."""
    samples = first_samples(eval_set, num_samples)
    captions = [s.caption for s in samples]
    size = params.height or sampler.default_resolution
    scores = StageScores(inception, clip)
    shown: list[np.ndarray] = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        images = sampler.txt2img(chunk, [seed + start + i for i in range(len(chunk))], params, batch_size=batch_size)
        scores.add(images, chunk)
        shown.extend(im.to_uint8() for im in images[:max(0, preview - len(shown))])
    metrics, info = scores.finish(eval_set, samples, size, batch_size, cache_dir)
    info.update({"eval_set": eval_set.uri, "eval_set_manifest_sha256": eval_set.manifest_sha256,
                 "sampler": params.sampler, "steps": params.steps, "guidance": params.guidance,
                 "seed": seed, "resolution": size})
    return ScoreResult({"num_samples": float(len(samples)), **metrics}, info, shown)


@dataclass
class CascadeScores:
    metrics: dict[str, float]
    """Each stage's metrics named with its resolution: fid_16px, clip_score_32px, ... and num_samples."""
    info: dict[str, Any]
    previews: dict[int, list[np.ndarray]]
    """Resolution -> the first generated images of that stage (uint8 HWC)."""


def cascade_images(base: Any, upscalers: list[Any], captions: list[str], seeds: list[int], params: Any,
                   noise_level: int, upscaler_params: Any | None = None) -> list[list[Any]]:
    """Every stage's `GeneratedImage`s for one batch: base txt2img, then each upscaler (with `upscaler_params`,
    default `params`) on the previous stage's images rounded to uint8 (what a PNG between stages stores, as
    `jobs/generate.py` does)."""
    from latentforge.upscaler.cascade import run_upscalers

    made = base.txt2img(captions, seeds, replace(params, height=None, width=None), batch_size=len(captions))
    images = np.stack([m.to_uint8() for m in made])  # (B, h, w, 3)
    return [made, *run_upscalers(upscalers, images, captions, seeds, upscaler_params or params, noise_level)]


def score_cascade(base: Any, upscalers: list[Any], eval_set: EvalSet, num_samples: int, params: Any,
                  noise_level: int, seed: int = 0, batch_size: int = 8, inception: InceptionFeatures | None = None,
                  clip: ClipScorer | None = None, cache_dir: str | None = None, preview: int = 16,
                  upscaler_params: Any | None = None) -> CascadeScores:
    """FID and CLIP score of every stage at its own resolution (FID reference: the real images resized to it)."""
    upscaler_params = upscaler_params or params
    samples = first_samples(eval_set, num_samples)
    captions = [s.caption for s in samples]
    sizes = [base.default_resolution, *(u.resolution for u in upscalers)]
    scores = [StageScores(inception, clip) for _ in sizes]
    previews: dict[int, list[np.ndarray]] = {size: [] for size in sizes}
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        stages = cascade_images(base, upscalers, chunk, [seed + start + i for i in range(len(chunk))], params,
                                noise_level, upscaler_params)
        for size, stage_scores, images in zip(sizes, scores, stages):
            stage_scores.add(images, chunk)
            previews[size].extend(im.to_uint8() for im in images[:max(0, preview - len(previews[size]))])
    metrics: dict[str, float] = {"num_samples": float(len(samples))}
    info: dict[str, Any] = {"eval_set": eval_set.uri, "sampler": params.sampler, "steps": params.steps,
                            "guidance": params.guidance, "seed": seed, "noise_level": noise_level,
                            "upscaler_steps": upscaler_params.steps, "upscaler_guidance": upscaler_params.guidance,
                            "resolutions": sizes}
    for size, stage_scores in zip(sizes, scores):
        stage_metrics, stage_info = stage_scores.finish(eval_set, samples, size, batch_size, cache_dir)
        metrics.update({f"{name}_{size}px": value for name, value in stage_metrics.items()})
        info.update({f"{name}_{size}px" if name.startswith("fid_reference_cache") else name: value
                     for name, value in stage_info.items()})
    return CascadeScores(metrics, info, previews)
