"""diffusers' pipelines vs jobs/generate.py on one export: the same prompts, seeds, sampler, steps, guidance.

Both sides return images as int16 arrays (N, H, W, 3) in 0..255, so a test compares them with a
per-pixel tolerance of 1 (1/255).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = ["a red circle at the top", "two blue squares!"]
SEEDS = [3, 11]
STEPS = 8
GUIDANCE = 3.5


def load_pipeline(folder: str | Path, cls_name: str = "StableDiffusionPipeline") -> Any:
    """A diffusers pipeline class loaded from ``folder`` offline, as a user would."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_images(pipe: Any, **inputs: Any) -> np.ndarray:
    """PROMPTS through ``pipe`` (its default DDIM scheduler), one generator per seed."""
    import torch

    images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in SEEDS], **inputs).images
    return (images * 255).round().astype(np.int16)


def generate_job_images(model: str | Path, work: Path, *extra: str) -> np.ndarray:
    """PROMPTS through `jobs/generate.py --model model` (a subprocess), DDIM, text states: the manifest's."""
    from PIL import Image

    from tests.harness.job_process import run_job

    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "seed": s}) + "\n" for p, s in zip(PROMPTS, SEEDS)))
    out = work / "gen"
    proc = run_job("generate", ["--model", str(model), "--prompts", str(prompts), "--out", str(out),
                                "--sampler", "ddim", "--steps", str(STEPS), "--guidance", str(GUIDANCE),
                                "--no-progress", "--no-mlflow", *extra], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.stack([np.asarray(Image.open(out / f"{i:06d}.png")).astype(np.int16) for i in range(len(PROMPTS))])
