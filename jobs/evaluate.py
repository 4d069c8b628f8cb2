"""Evaluate a trained LatentForge model: FID and CLIP score on an eval set, per stage for a cascade,
or an upscaler's PSNR / SSIM against bicubic on held-out pairs (docs/evaluation.md).

    python jobs/evaluate.py --model STORAGE/RUN/export --eval-set LATENTS_OR_SHARDS \
        --fid-weights pt_inception-2015-12-05-6726825d.pth --clip-model ViT-B-32 --clip-weights laion2b_s34b_b79k
    python jobs/evaluate.py --model RUN_ID --eval-set LATENTS --num-samples 2048
    python jobs/evaluate.py --model BASE --upscaler SR --eval-set LATENTS32 --fid-weights ... --clip-model ...
    python jobs/evaluate.py --upscaler SR --eval-set HELDOUT32 --noise-level 0 --num-samples 64

The metrics are logged into the MLflow run each checkpoint came from (and into an evaluate run).
"""

from __future__ import annotations

import logging
import sys

import _bootstrap  # noqa: F401  (puts the repo root on sys.path)

from latentforge.config import parse_config
from latentforge.evaluation.config import EvaluateConfig


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(EvaluateConfig, argv, preset_dir=_bootstrap.PRESETS / "evaluate",
                          description=(__doc__ or "").strip().splitlines()[0])

    def work() -> object:
        config.check_required()  # before the heavy imports: a missing flag fails at once
        from pipelines.evaluate import run

        return run(config)

    return _bootstrap.run_job("evaluate", work, interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
