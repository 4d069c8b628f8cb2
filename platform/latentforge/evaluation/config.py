"""`jobs/evaluate.py` options (dataclass defaults < `jobs/configs/evaluate/*.yaml` < flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentforge.config import comma_list
from latentforge.diffusion.schedulers import canonical_sampler
from latentforge.evaluation.fid import INCEPTION_SHA256
from latentforge.generation.config import DTYPES
from latentforge.generation.sampler import TEXT_STATE_MODES
from latentforge.tracking import TrackingOptions


@dataclass
class EvaluateConfig(TrackingOptions):
    """Score a trained model on an eval set: FID and CLIP score (per stage for a cascade), or an upscaler's
    PSNR / SSIM against bicubic on held-out pairs; logged into the training run(s)."""

    model: str = ""
    """Export dir, a training run dir holding export/, an MLflow run id, a diffusers folder made by
    jobs/export_model.py, or models:/NAME/VERSION (all lead to the same train export)."""
    upscaler: list[str] = field(default_factory=list)
    """Super-resolution export(s), repeated or a comma list: with --model the cascade's FID / CLIP score at every stage's
    resolution; alone (one export) its SR fidelity on --eval-set's held-out images against bicubic."""
    eval_set: str = ""
    """Latent shards with captions (precompute output) or image shards (ingest output); for SR fidelity the
    held-out high-res images: precompute output made with --store-pixels at the upscaler's resolution, or
    ingest shards."""
    out: str | None = None
    """Where the sample grid and metrics.json go (default: <export>/eval/step_XXXXXX)."""
    num_samples: int = 256
    """Captions sampled (first N of the eval set, one image each) = N of the FID; SR fidelity: held-out pairs."""
    noise_level: int = 20
    """Upscalers: noise-augmentation level of the low-res input, within the stage's trained range."""
    upscaler_steps: int | None = None
    """Upscalers: denoising steps of every super-resolution stage (default: --steps)."""
    upscaler_guidance: float | None = None
    """Upscalers: classifier-free guidance scale of every super-resolution stage (default: --guidance)."""
    sampler: str = "ddim"
    """ddpm | ddim | dpmsolver++ | euler."""
    steps: int = 50
    """Denoising steps."""
    guidance: float = 4.0
    """Classifier-free guidance scale."""
    negative_prompt: str = ""
    """Unconditional text for guidance."""
    seed: int = 0
    """Caption i is sampled with seed + i."""
    batch_size: int = 8
    """Images per batch."""
    text_states: str = "auto"
    """auto (the data manifest's) | real_tokens | full (see jobs/generate.py)."""
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
    device: str = "auto"
    """cpu | cuda | auto."""
    dtype: str = "fp32"
    """fp32 | fp16 | bf16 for the sampler."""
    run_name: str | None = None
    """MLflow run name (default: evaluate-<run or export name>)."""

    def __post_init__(self) -> None:
        self.sampler = canonical_sampler(self.sampler)
        self.upscaler = comma_list(self.upscaler)
        if self.num_samples < 2:
            raise ValueError("num_samples must be >= 2")
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if self.steps < 1 or self.batch_size < 1 or (self.upscaler_steps is not None and self.upscaler_steps < 1):
            raise ValueError("steps, upscaler_steps and batch_size must be >= 1")
        if self.text_states not in ("auto", *TEXT_STATE_MODES):
            raise ValueError(f"text_states must be auto or one of {list(TEXT_STATE_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}")

    @property
    def upscalers(self) -> list[str]:
        return list(self.upscaler)

    def check_required(self) -> None:
        missing = [] if self.model or self.upscalers else ["--model (or --upscaler)"]
        missing += ["--eval-set"] if not self.eval_set else []
        if missing:
            raise ValueError(f"missing required option(s): {', '.join(missing)}")
        if not self.model and len(self.upscalers) > 1:
            raise ValueError("SR fidelity (--upscaler without --model) scores one upscaler at a time; "
                             "a chain of upscalers needs --model (per-stage FID / CLIP score)")
