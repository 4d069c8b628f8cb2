"""Ingest: URL+caption lists -> WebDataset shards (NNNNN.tar + .parquet ledger + _stats.json).

    python jobs/download_images.py --input urls.parquet --output shards/ [--preset laion] [options]
    ray job submit --working-dir . -- python jobs/download_images.py --input ... --output ...

Exit codes: 0 done, 1 stage failure, 2 bad config/input/output dir, 130/143 on SIGINT/SIGTERM
(finished shards stay recorded; rerunning the same command resumes).
"""

from __future__ import annotations

import logging
import sys

try:
    import _bootstrap  # noqa: F401  (python jobs/download_images.py from a checkout)
except ImportError:  # imported as jobs.download_images
    from jobs import _bootstrap  # noqa: F401

from latentforge.config import ConfigError, parse_config
from latentforge.ingest.config import IngestConfig
from latentforge.ingest.inputs import InputError
from latentforge.manifest import MANIFEST_NAME, ManifestError

PRESET_DIR = _bootstrap.PRESETS / "ingest"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_config(IngestConfig, argv, preset_dir=PRESET_DIR,
                          description=(__doc__ or "").strip().splitlines()[0])
    from pipelines import ingest

    def work() -> object:
        try:
            return ingest.run(config)
        except ingest.Interrupted as exc:  # ingest records what finished, then stops: the signal's exit code
            raise KeyboardInterrupt(exc.signum) from exc

    resume = f"interrupted; finished shards are recorded in {config.output}/{MANIFEST_NAME}, rerun to resume"
    return _bootstrap.run_job("ingest", work, usage_errors=(ConfigError, InputError, ManifestError), interrupted=resume)


if __name__ == "__main__":
    sys.exit(main())
