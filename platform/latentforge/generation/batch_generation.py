"""Generate a list of requests into a directory (used in-process and by each Ray sampler actor)."""

from __future__ import annotations

from typing import Any, Sequence

from latentforge import storage
from latentforge.generation.outputs import Request, request_row, save_png
from latentforge.generation.sampler import Sampler, SampleParams


def generate_to_dir(sampler: Sampler, requests: Sequence[Request], params: SampleParams, out_dir: str,
                    batch_size: int = 4, init_image: str | None = None, strength: float = 1.0,
                    extra_meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Sample each request, write `NNNNNN.png` atomically, return the index rows."""
    rows: list[dict[str, Any]] = []
    storage.makedirs(out_dir)
    for start in range(0, len(requests), max(1, batch_size)):
        chunk = list(requests[start:start + batch_size])
        prompts, seeds = [r.prompt for r in chunk], [r.seed for r in chunk]
        if init_image:
            images = sampler.img2img(init_image, prompts, seeds, strength, params, batch_size=len(chunk))
        else:
            images = sampler.txt2img(prompts, seeds, params, batch_size=len(chunk))
        for req, img in zip(chunk, images):
            height, width = img.array.shape[:2]
            meta = {"prompt": req.prompt, "seed": req.seed, **img.meta, "height": height, "width": width,
                    "init_image": init_image or "", **(extra_meta or {})}
            sha = save_png(storage.join(out_dir, req.file), img.to_uint8(), meta)
            rows.append({**request_row(req, meta), "sha256": sha})
    return rows
