"""`TrainConfig`: every option of the train stage (defaults < jobs/configs/train/*.yaml < flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from latentforge.config import ConfigError
from latentforge.tracking import TrackingOptions
from latentforge.trained_model import EXPORT_FORMATS
from latentforge.upscaler import DEFAULT_MAX_NOISE_LEVEL
from latentforge.training.options import CheckpointOptions, ClusterOptions, OptimizerOptions


@dataclass
class TrainConfig(CheckpointOptions, ClusterOptions, OptimizerOptions, TrackingOptions):
    """Train a latent-diffusion UNet on precomputed latents with Ray Train + Accelerate."""

    data: str = ""
    """Precompute output directory or fsspec URI (its manifest.json must have stage 'precompute')."""
    unet: str = "tiny"
    """UNet preset (tiny, sd15, sd2-base) or a diffusers UNet2DConditionModel config.json path."""
    steps: int = 100
    """Optimizer steps to train (the LR schedule spans exactly this many)."""
    batch_size: int = 16
    """Micro-batch size per worker; global batch = batch_size * num_workers * grad_accum."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass (less memory, about 30 percent more compute)."""
    ema_decay: float = 0.9999
    """EMA decay (diffusers EMAModel, warm-up (1+n)/(10+n) capped at this); 0 = no EMA, export raw weights."""
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the UNet predicts: the noise (epsilon) or the velocity (v_prediction)."""
    snr_gamma: float = 0.0
    """Min-SNR-gamma loss weighting (5.0 is the paper's value); 0 = unweighted MSE."""
    offset_noise: float = 0.0
    """Offset-noise strength (0.05-0.1 typical); 0 = off."""
    cfg_dropout: float = 0.1
    """Probability of replacing a caption by the empty caption (classifier-free guidance training)."""
    condition_dropout: float = 0.1
    """Probability of replacing all of a sample's class / scalar conditions by the null condition, drawn
    independently of cfg_dropout (docs/conditioning.md); unused when the data has no conditions."""
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    """DDPMScheduler beta schedule."""
    num_train_timesteps: int = 1000
    """DDPM timesteps."""
    stage: Literal["base", "upscaler"] = "base"
    """What the UNet learns: base (text -> latents) or upscaler (super-resolution: the noisy latent concatenated
    with a low-res image made from the sample's stored pixels, needs precompute --store-pixels;
    docs/super_resolution.md)."""
    lowres_factor: int = 4
    """Upscaler: the high-res image is downsampled by this factor to make the low-res input."""
    max_noise_level: int = DEFAULT_MAX_NOISE_LEVEL
    """Upscaler: noise-augmentation levels of the low-res input are drawn from [0, this] (SD x4: 350)."""
    lowres_blur: float = 0.0
    """Upscaler: largest Gaussian blur sigma (high-res px) drawn per sample before downsampling; 0 = none."""
    lowres_jpeg: int = 0
    """Upscaler: lowest JPEG quality drawn per sample (up to 95) for the low-res input; 0 = no JPEG."""
    residual: bool = True
    """Upscaler: learn the scaled residual over the latent of the low-res image's bicubic upsample (beats bicubic
    within a small budget; no StableDiffusionUpscalePipeline form); --no-residual learns the high-res latent itself,
    SD x4's recipe, which exports to that pipeline (docs/super_resolution.md)."""
    seed: int = 0
    """Seed for the weights, the noise/timestep generator and the data order."""
    shuffle_buffer: int = 1000
    """Local shuffle window (samples) within each worker's part of the data; permuted per epoch."""
    read_concurrency: int = 2
    """Shard reads in flight per worker's stream. Reads only fetch tar bytes and the order is fixed,
    so one shard ahead is enough locally; raise it for high-latency object stores. Unbounded reads
    start a task per shard at every epoch start, which stalls the step (the executor runs in the
    training worker's process)."""
    val_samples: int = 0
    """Samples held out (the last ones of the dataset) for the validation loss; 0 = none."""
    eval_every: int = 0
    """Validation loss and in-training eval every N steps on rank 0 (0 = off)."""
    eval_prompts: list[str] = field(default_factory=list)
    """Prompts for the in-training eval (sample grid, CLIP score, FID); empty = validation loss only."""
    eval_seeds: Optional[list[int]] = None
    """One seed per prompt (default: 0, 1, ...)."""
    eval_sampler: str = "ddim"
    """Sampler for in-training samples."""
    eval_steps: int = 20
    """Sampler steps for in-training samples."""
    eval_guidance: float = 4.0
    """Classifier-free guidance scale for in-training samples."""
    eval_fid_weights: Optional[str] = None
    """Inception weights for in-training FID (None = no FID)."""
    eval_clip_model: Optional[str] = None
    """CLIP model for in-training CLIP score (None = no CLIP score)."""
    eval_clip_weights: Optional[str] = None
    """CLIP weights for in-training CLIP score."""
    eval_set: Optional[str] = None
    """Reference image set for in-training FID."""
    eval_num_fid_samples: int = 256
    """Images generated for in-training FID (only with eval_fid_weights)."""
    export_formats: list[str] = field(default_factory=list)
    """After the export: also write these (diffusers | single-file | mlflow, see jobs/export_model.py);
    checked against the data before training starts."""
    trace_dir: Optional[str] = None
    """Debug/test: each rank appends step, loss and sample keys as JSON lines under this directory."""

    def validate(self) -> None:
        super().validate()
        self.check_at_least(1, "steps", "batch_size", "grad_accum", "shuffle_buffer", "read_concurrency",
                            "num_train_timesteps")
        self.check_at_least(0, "snr_gamma", "offset_noise", "val_samples", "eval_every", "eval_num_fid_samples")
        self.check_fraction("cfg_dropout", "condition_dropout")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        self._check_eval()
        from latentforge.upscaler.training import check_options

        check_options(self)
        unknown = sorted(set(self.export_formats) - set(EXPORT_FORMATS))
        if unknown:
            raise ConfigError(f"export_formats: unknown {unknown}; expected some of {list(EXPORT_FORMATS)}")

    def _check_eval(self) -> None:
        """In-training eval settings that could not work, refused here instead of warned about in a worker."""
        if (self.eval_fid_weights or self.eval_clip_model or self.eval_set) and not self.eval_prompts:
            raise ConfigError("--eval-fid-weights, --eval-clip-model and --eval-set need --eval-prompts "
                              "(the in-training eval runs only with prompts)")
        if not self.eval_prompts:
            return
        if self.eval_every == 0:
            raise ConfigError("--eval-prompts needs --eval-every N > 0 (0 turns the in-training eval off)")
        try:
            self.eval_config()
        except ValueError as exc:
            raise ConfigError(f"in-training eval: {exc}") from exc

    @property
    def samples_per_step(self) -> int:
        """Samples one worker consumes per optimizer step."""
        return self.batch_size * self.grad_accum

    @property
    def global_batch(self) -> int:
        return self.samples_per_step * self.num_workers

    def eval_config(self) -> Any:
        """`latentforge.evaluation.in_training.InTrainingEvalConfig` from the eval_* fields."""
        from latentforge.evaluation.in_training import InTrainingEvalConfig

        return InTrainingEvalConfig(
            prompts=list(self.eval_prompts), seeds=self.eval_seeds, sampler=self.eval_sampler,
            steps=self.eval_steps, guidance=self.eval_guidance, fid_weights=self.eval_fid_weights,
            clip_model=self.eval_clip_model, clip_weights=self.eval_clip_weights, eval_set=self.eval_set,
            num_fid_samples=self.eval_num_fid_samples,
        )
