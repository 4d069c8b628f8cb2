"""Encode ingest shards into VAE latents + CLIP text embeddings (the precompute stage).

    ray job submit --working-dir . -- python jobs/precompute_latents.py \
        --preset sd2 --input /data/laion-shards --output /data/laion-latents-sd2

Options come from `PrecomputeConfig` (dataclass defaults < `--preset` YAML under
jobs/configs/precompute/ < flags); `--print-config` shows the resolved values. Without
RAY_ADDRESS the job starts an embedded local Ray.
"""

from __future__ import annotations

import sys

try:
    import _bootstrap  # noqa: F401  (python jobs/precompute_latents.py: puts the repository root on sys.path)
except ImportError:
    from jobs import _bootstrap  # noqa: F401  (imported as jobs.precompute_latents, e.g. by tests and the demo)

import pipelines  # noqa: F401  (puts platform/ on sys.path when latentforge is not installed)
from latentforge.config import ConfigError, parse_config
from latentforge.manifest import ManifestError
from latentforge.precompute.config import PrecomputeConfig


def main(argv: list[str] | None = None) -> int:
    flags = {arg.split("=", 1)[0] for arg in (sys.argv[1:] if argv is None else argv)}
    if {"--resolution", "--resolutions"} <= flags:  # a preset's resolution is simply replaced by --resolutions
        print("precompute: --resolution and --resolutions exclude each other: give one size or the list",
              file=sys.stderr)
        return 2
    try:
        config = parse_config(PrecomputeConfig, argv, preset_dir=_bootstrap.PRESETS / "precompute")
    except SystemExit as exc:  # argparse usage errors (2) and --print-config / --help (0)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2

    def work() -> object:
        config.check_required()
        from pipelines.precompute import run

        return run(config)

    return _bootstrap.run_job("precompute", work, usage_errors=(ConfigError, ManifestError),
                              interrupted="interrupted; finished shards are kept, rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
