"""Train a latent-diffusion UNet on precomputed latents (Ray Train + Accelerate).

    python jobs/train.py --preset tiny --data latents/ --steps 200 --run-name demo
    ray job submit --working-dir . -- python jobs/train.py --preset sd2-base --data s3://bucket/latents \
        --num-workers 8 --use-gpu --storage-path s3://bucket/runs --run-name sd2-256
Rerunning with the same --run-name resumes from its latest checkpoint. --print-config shows the
resolved settings; `--preset` picks jobs/configs/train/<name>.yaml (tiny, sd15, sd2-base).
"""

from __future__ import annotations

import logging
import signal
import sys

try:
    import _bootstrap  # noqa: F401  (python jobs/train.py: puts the repository root on sys.path)
except ImportError:
    from jobs import _bootstrap  # noqa: F401  (imported as jobs.train, e.g. by tests and the demo)

from latentforge.config import ConfigError, parse_config
from latentforge.training.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(TrainConfig, argv, preset_dir=_bootstrap.PRESETS / "train",
                          description=(__doc__ or "").strip().splitlines()[0])

    def stop(signum, _frame):  # noqa: ANN001
        raise KeyboardInterrupt(signum)

    signal.signal(signal.SIGTERM, stop)
    from pipelines.train import run

    try:
        result = run(config)
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        print("train: interrupted; rerun with the same --run-name to resume from the last checkpoint",
              file=sys.stderr)
        return 128 + int(signum)
    except (ConfigError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line, exit 1
        logging.getLogger("train").debug("failure", exc_info=True)
        print(f"train: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(result.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
