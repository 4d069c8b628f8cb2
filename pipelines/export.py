"""The export stage: a train export -> a diffusers folder, a single-file checkpoint or an MLflow model.

No Ray graph: one model is converted in one process. Every target is checked before anything is
written, writes into a temp location and publishes with one rename (see latentforge.conversion).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from latentforge import storage
from latentforge.conversion.config import ExportConfig
from latentforge.conversion.target import ExportRefused, Source, load_source
from latentforge.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    format: str
    out: str
    source_digest: str
    seconds: float
    summary: str = ""


def default_out(source: Source, fmt: str) -> str:
    """Beside the export, in the training run's dir; for mlflow the artifact path in the run."""
    parent = source.model.export_dir.rstrip("/").rsplit("/", 1)[0] if "/" in source.model.export_dir else "."
    return {"diffusers": storage.join(parent, "diffusers"), "single-file": storage.join(parent, "model.safetensors"),
            "mlflow": "model"}[fmt]


def _local(out: str) -> str:
    if "://" in out and not out.startswith("file://"):
        raise ExportRefused(f"--out {out}: only local paths are written (copy the result afterwards)")
    return out.removeprefix("file://")


def export_to(source: Source, config: ExportConfig) -> str:
    """Write ``source`` in ``config.format``; returns where it went."""
    out = config.out or default_out(source, config.format)
    if source.upscaler:
        check_upscaler_format(config.format)
        from latentforge.conversion.upscale_folder import write_upscale_folder

        return str(write_upscale_folder(source, _local(out), config.sampler))
    if config.format == "diffusers":
        from latentforge.conversion.diffusers_folder import write_diffusers_folder

        return str(write_diffusers_folder(source, _local(out), config.sampler))
    if config.format == "single-file":
        from latentforge.conversion.single_file import write_single_file

        return write_single_file(source, _local(out), config.title, config.dtype)
    from latentforge.conversion.mlflow_model import log_export

    logged = log_export(source, out, config.register_as, config.sampler)
    return logged.get("registry_uri") or logged["model_uri"]


def check_upscaler_format(fmt: str) -> None:
    if fmt != "diffusers":
        raise ExportRefused(f"{fmt} export refused: the model is an upscaler, which exports as a diffusers "
                            "StableDiffusionUpscalePipeline folder only; fix: --format diffusers")


def preflight(data_manifest: Manifest, formats: list[str], tracked: bool,
              upscaler: dict[str, Any] | None = None) -> None:
    """Training's --export-formats: refuse before training what could not be exported after it
    (``upscaler``: the run's future ``extra.upscaler`` when it trains one)."""
    from latentforge.conversion.diffusers_folder import check_diffusers
    from latentforge.conversion.mlflow_model import check_mlflow
    from latentforge.conversion.single_file import check_single_file
    from latentforge.conversion.upscale_folder import check_upscale

    if upscaler is not None:
        for fmt in formats:
            check_upscaler_format(fmt)
        check_upscale(data_manifest, upscaler)
        return
    checks = {"diffusers": check_diffusers, "single-file": check_single_file,
              "mlflow": lambda manifest: check_mlflow(manifest, "tracked" if tracked else None)}
    for fmt in formats:
        checks[fmt](data_manifest)


def export_formats(export_uri: str, formats: list[str]) -> list[str]:
    """Training's final export: each format with its defaults beside the export; returns where each went."""
    return [run(ExportConfig(model=export_uri, format=fmt)).out for fmt in formats]


def run(config: ExportConfig) -> ExportResult:
    start = time.perf_counter()
    source = load_source(config.model)
    out = export_to(source, config)
    seconds = time.perf_counter() - start
    summary = f"export: {config.format} -> {out} (from {source.model.export_dir}, {seconds:.1f}s)"
    return ExportResult(config.format, out, source.digest, seconds, summary)
