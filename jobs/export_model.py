"""Export a trained model for use outside LatentForge.

    python jobs/export_model.py --model STORAGE/RUN/export --format diffusers --out sd-folder/
    python jobs/export_model.py --model RUN_ID --format single-file --out model.safetensors
    python jobs/export_model.py --model RUN_ID --format mlflow --register-as my-model

An upscaler export (jobs/train.py --stage upscaler) becomes a StableDiffusionUpscalePipeline folder
with --format diffusers (docs/super_resolution.md, "Export").
"""

from __future__ import annotations

import logging
import sys

import _bootstrap  # noqa: F401  (puts the repo root on sys.path)

from latentforge.config import parse_config
from latentforge.conversion.config import ExportConfig


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(ExportConfig, argv, preset_dir=_bootstrap.PRESETS / "export",
                          description=(__doc__ or "").strip().splitlines()[0])

    def work() -> object:
        config.check_required()
        from pipelines.export import run

        return run(config)

    from latentforge.manifest import ManifestError
    from latentforge.trained_model import ExportError

    return _bootstrap.run_job("export", work, usage_errors=(ValueError, ExportError, ManifestError),
                              interrupted="interrupted; nothing was published")


if __name__ == "__main__":
    sys.exit(main())
