"""Generate images from a trained LatentForge model.

    python jobs/generate.py --model STORAGE/RUN/export --prompts "a red circle" --out samples/
    python jobs/generate.py --model RUN_ID --prompts prompts.txt --out samples/ --sampler dpmsolver++ --steps 20
    python jobs/generate.py --model RUN_ID --prompts "a cat" --init-image in.png --strength 0.6 --out samples/
    ray job submit --working-dir . -- python jobs/generate.py --model ... --prompts big.txt --out s3://... --ray \
        --concurrency 8
"""

from __future__ import annotations

import logging
import sys

import _bootstrap  # noqa: F401  (puts the repo root on sys.path)

from latentforge.config import parse_config
from latentforge.generation.config import GenerateConfig


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(GenerateConfig, argv, preset_dir=_bootstrap.PRESETS / "generate",
                          description=(__doc__ or "").strip().splitlines()[0])

    def work() -> object:
        config.check_required()  # before the heavy imports: a missing flag fails at once
        from pipelines.generate import run

        return run(config)

    return _bootstrap.run_job("generate", work, interrupted="interrupted; finished images are kept, rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
