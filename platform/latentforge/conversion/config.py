"""`jobs/export_model.py` options (dataclass defaults < `jobs/configs/export/*.yaml` < flags)."""

from __future__ import annotations

from dataclasses import dataclass

from latentforge.config import ConfigError, StageConfig
from latentforge.trained_model import EXPORT_FORMATS

SINGLE_FILE_DTYPES = ("fp32", "fp16")


@dataclass
class ExportConfig(StageConfig):
    """Export a trained model for diffusers, single-file tools (ComfyUI / A1111) or the MLflow registry."""

    model: str = ""
    """The train export: export dir (STORAGE/RUN/export), a training run dir holding export/, or an MLflow run id."""
    format: str = "diffusers"
    """diffusers (pipeline folder; StableDiffusionUpscalePipeline for an upscaler) | single-file (LDM-layout
    .safetensors) | mlflow (pyfunc on the training run)."""
    out: str | None = None
    """Output path. Default: EXPORT/../diffusers for diffusers, EXPORT/../model.safetensors for single-file;
    for mlflow the artifact path inside the training run (default: model)."""
    register_as: str | None = None
    """mlflow: also register the logged model under this Model Registry name."""
    sampler: str = "ddim"
    """The pipeline's default scheduler: ddim | dpmsolver++ (both from the training noise schedule)."""
    dtype: str = "fp32"
    """single-file: tensor dtype, fp32 (equal to the folder) | fp16 (half the size, what A1111 shares)."""
    title: str | None = None
    """single-file: ModelSpec title (default: the training run name or the export dir name)."""

    def validate(self) -> None:
        super().validate()
        if self.format not in EXPORT_FORMATS:
            raise ConfigError(f"format must be one of {list(EXPORT_FORMATS)}, got {self.format!r}")
        if self.sampler.lower() not in ("ddim", "dpmsolver++"):
            raise ConfigError(f"sampler must be ddim or dpmsolver++, got {self.sampler!r}")
        if self.dtype not in SINGLE_FILE_DTYPES:
            raise ConfigError(f"dtype must be one of {list(SINGLE_FILE_DTYPES)}")
        if self.register_as is not None and self.format != "mlflow":
            raise ConfigError("--register-as needs --format mlflow")

    def missing_options(self) -> list[str]:
        return [] if self.model else ["--model"]
