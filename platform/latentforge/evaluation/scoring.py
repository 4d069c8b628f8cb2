"""Sample captions of an eval set and score the samples: FID against the eval set's real images
(reference statistics cached under their content hash) and CLIP score against the captions."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from latentforge.evaluation.clip_score import ClipScorer, clip_score_from_embeddings
from latentforge.evaluation.eval_set import EvalSet, iter_samples, real_image_batches
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


def score_sampler(sampler: Any, eval_set: EvalSet, num_samples: int, params: Any, seed: int = 0,
                  batch_size: int = 8, inception: InceptionFeatures | None = None, clip: ClipScorer | None = None,
                  cache_dir: str | None = None, preview: int = 16) -> ScoreResult:
    """Generate one image per caption of the first `num_samples` eval samples (seed + i) and score them."""
    samples = list(iter_samples(eval_set, num_samples))
    if not samples:
        raise ValueError(f"{eval_set.uri}: no samples to evaluate")
    captions = [s.caption for s in samples]
    size = params.height or sampler.default_resolution
    gen_stats = FeatureStats(inception.dim) if inception is not None else None
    img_emb: list[torch.Tensor] = []
    txt_emb: list[torch.Tensor] = []
    shown: list[np.ndarray] = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        images = sampler.txt2img(chunk, [seed + start + i for i in range(len(chunk))], params, batch_size=batch_size)
        pixels = torch.stack([torch.from_numpy(im.array).permute(2, 0, 1) * 2 - 1 for im in images])
        if gen_stats is not None:
            gen_stats.update(inception(to_uint8(pixels)))
        if clip is not None:
            img_emb.append(clip.embed_images(pixels))
            txt_emb.append(clip.embed_texts(chunk))
        shown.extend(im.to_uint8() for im in images[:max(0, preview - len(shown))])
    metrics: dict[str, float] = {"num_samples": float(len(samples))}
    info: dict[str, Any] = {"eval_set": eval_set.uri, "eval_set_manifest_sha256": eval_set.manifest_sha256,
                            "sampler": params.sampler, "steps": params.steps, "guidance": params.guidance,
                            "seed": seed, "resolution": size}
    if inception is not None and gen_stats is not None:
        content = {"eval_set_manifest_sha256": eval_set.manifest_sha256, "keys": [s.key for s in samples],
                   "n": len(samples), "weights_sha256": inception.weights_sha256, "resize": RESIZE_PATH,
                   "resolution": size, "reference": eval_set.reference_kind}

        def compute() -> FeatureStats:
            stats = FeatureStats(inception.dim)
            for batch in real_image_batches(eval_set, samples, size, batch_size):
                stats.update(inception(to_uint8(batch)))
            return stats

        ref, path, hit = cached_reference_stats(cache_dir or default_cache_dir(), content, compute)
        fid = fid_from_stats(gen_stats, ref)
        metrics.update(fid=fid["fid"], fid_num_samples=float(fid["fid_n"]),
                       fid_reference_num_samples=float(fid["fid_reference_n"]))
        info.update(inception.describe(), fid_reference=eval_set.reference_kind, fid_reference_cache=path,
                    fid_reference_cache_hit=hit)
        log.info("FID %.4f (N=%d generated, %d reference; %s)", fid["fid"], fid["fid_n"], fid["fid_reference_n"],
                 "reference stats from cache" if hit else "reference stats computed and cached")
    if clip is not None:
        value = clip_score_from_embeddings(torch.cat(img_emb), torch.cat(txt_emb))
        metrics["clip_score"] = value
        info.update(clip.describe(), clip_num_samples=len(samples))
        log.info("CLIP score %.4f (N=%d, %s, %s)", value, len(samples), clip.model_id, clip.describe()["clip_score_formula"])
    return ScoreResult(metrics, info, shown)
