"""Train or fine-tune a diffusers AutoencoderKL on ingest shards (Ray Train + Accelerate).

    python jobs/train_autoencoder.py --preset tiny --data shards/ --steps 300 --run-name ae-demo
    python jobs/train_autoencoder.py --preset default --data s3://bucket/shards --init ./sd-vae \
        --num-workers 8 --use-gpu --storage-path s3://bucket/ae-runs --run-name ae-finetune
The export (STORAGE/RUN_NAME/export) is an ordinary AutoencoderKL directory with the latent
scaling factor measured on the data: `python jobs/precompute_latents.py --vae EXPORT
--vae-type autoencoder_kl ...`. Rerunning with the same --run-name resumes from its latest
checkpoint. --print-config shows the resolved settings; `--preset` picks
jobs/configs/train_autoencoder/<name>.yaml (tiny, demo, default).
"""

from __future__ import annotations

import logging
import sys

try:
    import _bootstrap  # noqa: F401  (python jobs/train_autoencoder.py: puts the repository root on sys.path)
except ImportError:
    from jobs import _bootstrap  # noqa: F401  (imported as jobs.train_autoencoder, e.g. by tests)

from latentforge.autoencoder.config import AutoencoderTrainConfig
from latentforge.config import parse_config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(AutoencoderTrainConfig, argv, preset_dir=_bootstrap.PRESETS / "train_autoencoder",
                          description=(__doc__ or "").strip().splitlines()[0])

    from pipelines.train_autoencoder import run

    return _bootstrap.run_job("autoencoder", lambda: run(config), usage_errors=(ValueError,),
                              interrupted="interrupted; rerun with the same --run-name to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
