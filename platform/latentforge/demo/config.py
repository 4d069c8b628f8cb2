"""`DemoConfig`: what `jobs/demo.py` (`make demo`) reads from jobs/configs/demo/*.yaml and flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from latentforge.config import ConfigError
from latentforge.tracking import TrackingOptions


@dataclass
class DemoConfig(TrackingOptions):
    """The whole pipeline on generated scenes: ingest -> autoencoder -> precompute -> train -> generate."""

    out: str = "demo_output"
    """Where everything goes: scenes/, urls.parquet, shards/, latents/, checkpoints/, samples/."""
    fresh: bool = True
    """Start the stages from scratch (the generated scenes and the demo's autoencoder are reused when their
    settings match)."""
    rows: int = 4000
    """Scenes in the data set (balanced over 6 colours x 3 shapes x 4 positions)."""
    image_size: int = 64
    """Side of the generated scene images in px."""
    broken_every: int = 250
    """Every N-th URL is broken (404, an HTML page, a truncated PNG, in turn); 0 = none."""
    samples_per_shard: int = 500
    """Ingest shard size."""
    seed: int = 0
    """Seed of the scene generator, the training run and the sampling."""
    resolution: int = 16
    """Training resolution (precompute resizes/crops to it)."""
    vae: str = ""
    """VAE weights (diffusers dir or hub id) for --vae-type autoencoder_kl/autoencoder_tiny; '' with
    autoencoder_kl = train the demo's own AutoencoderKL on its scenes (jobs/train_autoencoder.py)."""
    vae_type: str = "autoencoder_kl"
    """autoencoder_kl (the default: the demo trains its own) | autoencoder_tiny | patchify (weight-free
    pixel_unshuffle; its model does not export to diffusers)."""
    autoencoder_preset: str = "demo"
    """Preset of the demo's own autoencoder (jobs/configs/train_autoencoder/<name>.yaml)."""
    autoencoder_steps: int = 0
    """Training steps of the demo's own autoencoder; 0 = the preset's. A finished autoencoder of the same
    scenes and settings is reused by the next run (delete OUT/autoencoder to retrain)."""
    text_states: Literal["full", "real_tokens"] = "full"
    """Text states precompute stores: full (what diffusers' StableDiffusionPipeline feeds, so the model
    exports) | real_tokens (masked real tokens; no diffusers export)."""
    text_encoder: str = "lf-tiny-clip"
    """open_clip model name; lf-tiny-clip is a tiny randomly initialised model shipped in the package."""
    text_encoder_weights: str | None = None
    """open_clip pretrained tag or checkpoint file; none with lf-tiny-clip = write a random checkpoint."""
    text_layer: str = "last"
    """Text encoder layer: last | penultimate."""
    unet_preset: str = "tiny-pooled"
    """UNet preset for training (tiny-pooled: tiny + the pooled caption in the time embedding, which the
    demo's position adherence needs; jobs/configs/demo/default.yaml has the measurements)."""
    steps: int = 2200
    """Training steps (jobs/configs/demo/default.yaml says why 2,200)."""
    batch_size: int = 32
    """Training batch size (global)."""
    lr: float = 2e-3
    """Peak learning rate."""
    num_workers: int = 1
    """Ray Train workers."""
    eval_every: int = 500
    """In-training evaluation (sample grid + metrics in the training run) every N steps."""
    checkpoint_every: int = 500
    """Checkpoint every N steps."""
    prompts: int = 288
    """Prompts for the adherence measurement (cycling every colour x position x shape, each with its own
    seed); 288 keeps the 95 % interval within +-5 points at >= 80 %."""
    sampler: str = "ddim"
    """Sampler for the adherence samples."""
    sample_steps: int = 15
    """Denoising steps for the adherence samples."""
    guidance: float = 3.0
    """Classifier-free guidance for the adherence samples."""
    upscale_to: int = 32
    """Final resolution of the cascade: a super-resolution stage (jobs/train.py --stage upscaler) takes the
    base model's samples from `resolution` to it; a multiple of `resolution`, <= image_size; 0 = base only."""
    heldout: int = 64
    """Held-out scenes (another seed, never trained on) for the upscaler's PSNR against bicubic."""
    sr_steps: int = 300
    """Training steps of the upscaler (jobs/configs/train/tiny-sr.yaml: residual, tiny-sr UNet, v-prediction)."""
    sr_batch_size: int = 8
    """Upscaler training batch size (global)."""
    sr_lr: float = 2e-3
    """Upscaler peak learning rate."""
    sr_max_noise_level: int = 20
    """Largest noise-augmentation level of the low-res input seen in upscaler training."""
    sr_noise_level: int = 0
    """Noise-augmentation level at sampling (cascade and held-out PSNR), within [0, sr_max_noise_level]."""
    sr_sample_steps: int = 1
    """Denoising steps of the upscaler's held-out PSNR: 1 step is its x0 (mean) estimate, the best PSNR
    (docs/super_resolution.md); the cascade's samples use `sample_steps`."""
    num_cpus: int | None = None
    """CPUs of the embedded local Ray (default: all)."""
    experiment: str = "latentforge-demo"
    """MLflow experiment of the demo's runs."""
    ui_port: int = 5000
    """Port printed in the `make mlflow` hint of the summary."""

    def validate(self) -> None:
        super().validate()
        self.check_at_least(1, "rows", "image_size", "samples_per_shard", "resolution", "steps", "batch_size",
                            "prompts", "sample_steps", "num_workers", "heldout", "sr_steps", "sr_batch_size",
                            "sr_sample_steps")
        self.check_at_least(0, "autoencoder_steps")  # 0 = the preset's
        if self.vae_type not in ("patchify", "autoencoder_kl", "autoencoder_tiny"):
            raise ConfigError(f"vae_type: {self.vae_type!r} is not patchify, autoencoder_kl or autoencoder_tiny")
        if self.vae and self.vae_type == "patchify":
            raise ConfigError("--vae given: also pass --vae-type autoencoder_kl or autoencoder_tiny")
        if self.resolution > self.image_size:
            raise ConfigError("resolution must be <= image_size (the scenes are not upscaled)")
        self._check_upscaler()

    def missing_options(self) -> list[str]:
        """Weights a run with a real model needs: the tiny VAE's, a real text encoder's."""
        missing = super().missing_options()
        if self.vae_type == "autoencoder_tiny" and not self.vae:
            missing.append("--vae (a diffusers directory or hub id, with --vae-type autoencoder_tiny)")
        if self.text_encoder != "lf-tiny-clip" and not self.text_encoder_weights:
            missing.append("--text-encoder-weights (a tag or file, with a --text-encoder other than lf-tiny-clip)")
        return missing

    def _check_upscaler(self) -> None:
        if not self.upscale_to:
            return
        if self.upscale_to <= self.resolution or self.upscale_to % self.resolution or self.upscale_to > self.image_size:
            raise ConfigError(f"upscale_to {self.upscale_to} must be a multiple of resolution {self.resolution} above "
                              f"it and <= image_size {self.image_size} (0 = no super-resolution stage)")
        if not 0 <= self.sr_noise_level <= self.sr_max_noise_level:
            raise ConfigError(f"sr_noise_level {self.sr_noise_level} must be in [0, sr_max_noise_level "
                              f"{self.sr_max_noise_level}]")

    @property
    def trains_autoencoder(self) -> bool:
        """The demo trains its own AutoencoderKL (no --vae given) before precompute."""
        return self.vae_type == "autoencoder_kl" and not self.vae

    @property
    def exports_to_diffusers(self) -> bool:
        """A diffusers VAE class and the pipeline's text-state convention: training exports a diffusers folder."""
        return self.vae_type != "patchify" and self.text_states == "full"
