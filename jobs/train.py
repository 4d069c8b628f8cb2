"""Train a latent-diffusion UNet on precomputed latents (Ray Train + Accelerate).

    python jobs/train.py --preset tiny --data latents/ --steps 200 --run-name demo
    ray job submit --working-dir . -- python jobs/train.py --preset sd2-base --data s3://bucket/latents \
        --num-workers 8 --use-gpu --storage-path s3://bucket/runs --run-name sd2-256
Rerunning with the same --run-name resumes from its latest checkpoint. --print-config shows the
resolved settings; `--preset` picks jobs/configs/train/<name>.yaml (tiny, sd15, sd2-base).
"""

from __future__ import annotations

import logging
import sys

try:
    import _bootstrap  # noqa: F401  (python jobs/train.py: puts the repository root on sys.path)
except ImportError:
    from jobs import _bootstrap  # noqa: F401  (imported as jobs.train, e.g. by tests and the demo)

from latentforge.config import parse_config
from latentforge.training.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(TrainConfig, argv, preset_dir=_bootstrap.PRESETS / "train",
                          description=(__doc__ or "").strip().splitlines()[0])

    from pipelines.train import run

    return _bootstrap.run_job("train", lambda: run(config), usage_errors=(ValueError,),
                              interrupted="interrupted; rerun with the same --run-name to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
