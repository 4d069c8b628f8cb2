"""`jobs/evaluate.py` options (dataclass defaults < `jobs/configs/evaluate/*.yaml` < flags)."""

from __future__ import annotations

from dataclasses import dataclass

from latentforge.config import ConfigError
from latentforge.evaluation.fid import INCEPTION_SHA256
from latentforge.generation.options import SamplingOptions, UpscalerOptions
from latentforge.tracking import TrackingOptions


@dataclass
class EvaluateConfig(SamplingOptions, UpscalerOptions, TrackingOptions):
    """Score a trained model on an eval set: FID and CLIP score (per stage for a cascade), or an upscaler's
    PSNR / SSIM against bicubic on held-out pairs; logged into the training run(s)."""

    model: str = ""
    """Export dir, a training run dir holding export/, an MLflow run id, a diffusers folder made by
    jobs/export_model.py, or models:/NAME/VERSION (all lead to the same train export)."""
    eval_set: str = ""
    """Latent shards with captions (precompute output) or image shards (ingest output); for SR fidelity the
    held-out high-res images: precompute output made with --store-pixels at the upscaler's resolution, or
    ingest shards."""
    out: str | None = None
    """Where the sample grid and metrics.json go (default: <export>/eval/step_XXXXXX)."""
    num_samples: int = 256
    """Captions sampled (first N of the eval set, one image each) = N of the FID; SR fidelity: held-out pairs."""
    batch_size: int = 8  # SamplingOptions' field (declared there, help text included), evaluate's own default
    fid_weights: str | None = None
    """pt_inception-2015-12-05 weights file, or 'download' (online only); unset = no FID."""
    fid_weights_sha256: str = INCEPTION_SHA256
    """Expected sha256 of fid_weights; another file is refused (no fallback weights)."""
    clip_model: str | None = None
    """open_clip model name for the CLIP score (unset = no CLIP score), e.g. ViT-B-32."""
    clip_weights: str | None = None
    """The CLIP model's pretrained tag or local checkpoint file."""
    cache_dir: str | None = None
    """FID reference statistics cache (default ~/.cache/latentforge/fid_reference)."""
    log_to_source_run: bool = True
    """Also log the metrics into the MLflow run the checkpoint came from (export manifest extra.mlflow_run_id)."""
    run_name: str | None = None
    """MLflow run name (default: evaluate-<run or export name>)."""

    def validate(self) -> None:
        super().validate()
        self.check_at_least(2, "num_samples")

    def missing_options(self) -> list[str]:
        missing = [] if self.model or self.upscalers else ["--model (or --upscaler)"]
        return missing + (["--eval-set"] if not self.eval_set else [])

    def check_required(self) -> None:
        super().check_required()
        if not self.model and len(self.upscalers) > 1:
            raise ConfigError("SR fidelity (--upscaler without --model) scores one upscaler at a time; "
                              "a chain of upscalers needs --model (per-stage FID / CLIP score)")
