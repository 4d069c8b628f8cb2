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
from latentforge.manifest import ManifestError

PRESET_DIR = _bootstrap.PRESETS / "ingest"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_config(IngestConfig, argv, preset_dir=PRESET_DIR,
                          description=(__doc__ or "").strip().splitlines()[0])
    from pipelines import ingest

    try:
        result = ingest.run(config)
    except (ConfigError, InputError) as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    except ManifestError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    except ingest.Interrupted as exc:
        print(f"ingest: stopped by {exc}; finished shards are recorded in {config.output}/manifest.json, "
              "rerun the same command to resume", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ingest: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a stage failure: clear message, exit 1
        logging.getLogger("ingest").exception("ingest failed")
        print(f"ingest: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(result.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
