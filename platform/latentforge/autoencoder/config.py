"""`AutoencoderTrainConfig`: every option of the autoencoder stage (defaults < presets < flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from latentforge.config import ConfigError
from latentforge.tracking import TrackingOptions
from latentforge.training.options import CheckpointOptions, ClusterOptions, OptimizerOptions


@dataclass
class AutoencoderTrainConfig(CheckpointOptions, ClusterOptions, OptimizerOptions, TrackingOptions):
    """Train or fine-tune a diffusers AutoencoderKL on ingest shards with Ray Train + Accelerate."""

    data: str = ""
    """Ingest output directory or fsspec URI (NNNNN.tar WebDataset shards + a manifest of stage 'ingest')."""
    init: Optional[str] = None
    """Fine-tune: a local diffusers AutoencoderKL directory (save_pretrained layout, safetensors). None = from scratch."""
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    """From scratch: channels per resolution level; the image is downsampled 2**(levels-1) times."""
    layers_per_block: int = 1
    """From scratch: ResNet layers per encoder/decoder level."""
    latent_channels: int = 4
    """From scratch: channels of the latent (must match the UNet trained on it later)."""
    norm_num_groups: int = 32
    """From scratch: GroupNorm groups; must divide every entry of block_out_channels."""
    resolution: int = 64
    """Training images are resized (shorter side) and centre-cropped to resolution x resolution."""
    resize_filter: Literal["bicubic", "bilinear", "lanczos"] = "bicubic"
    """PIL resampling filter for the resize (the same preprocessing precompute applies)."""
    steps: int = 2000
    """Optimizer steps (the LR schedule spans exactly this many)."""
    batch_size: int = 16
    """Images per worker per step; global batch = batch_size * num_workers."""
    l1_weight: float = 1.0
    """Weight of the pixel L1 reconstruction loss."""
    l2_weight: float = 0.0
    """Weight of the pixel L2 (MSE) reconstruction loss."""
    kl_weight: float = 1e-6
    """Weight of the KL divergence of the posterior from N(0, I) (SD's VAEs use 1e-6)."""
    lpips_weights: Optional[str] = None
    """Perceptual (LPIPS) term: a local safetensors file of torchmetrics' LPIPS network (backbone + linear
    layers, written by safetensors.torch.save_model). None = no perceptual term (nothing is downloaded)."""
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    """Backbone of the LPIPS network whose weights lpips_weights holds."""
    lpips_weight: float = 0.1
    """Weight of the LPIPS term (used only with lpips_weights)."""
    discriminator: bool = False
    """Add a PatchGAN discriminator (hinge loss) and its adversarial term to the autoencoder loss."""
    disc_weight: float = 0.5
    """Weight of the adversarial term -D(reconstruction) in the autoencoder loss."""
    disc_start: int = 0
    """Step from which the discriminator trains and its term counts (SD lets reconstructions settle first)."""
    disc_layers: int = 3
    """Stride-2 convolutions of the discriminator; its patches grow with it (3 needs >= 16 px images)."""
    disc_channels: int = 64
    """Channels of the discriminator's first convolution (doubling per layer, at most 8x)."""
    disc_lr: float = 0.0
    """Discriminator learning rate (AdamW, same schedule); 0 = lr."""
    sample_posterior: bool = True
    """Decode a posterior sample during training (True, as SD does) or the posterior mean."""
    seed: int = 0
    """Seed for the initial weights, posterior samples and the data order."""
    val_samples: int = 16
    """Held-out images (the first decodable ones of the last shard, never trained on) for PSNR / SSIM."""
    eval_every: int = 200
    """PSNR / SSIM on the held-out images and a reconstruction grid to MLflow every N steps (0 = only at the end)."""
    grid_scale: int = 4
    """The reconstruction grid is upscaled by this factor (nearest) so small images are visible."""
    scale_samples: int = 256
    """Images encoded to measure the latent std for the exported scaling_factor (SD's 1/std rule)."""

    # The sections' fields whose default (or meaning) differs here.
    weight_decay: float = 0.0
    """AdamW weight decay."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay as a fraction of lr."""
    num_workers: int = 1
    """Ray Train workers (one per GPU with --use-gpu); shards are dealt round-robin to them."""
    storage_path: str = "autoencoder_runs"
    """Where checkpoints and the export go: a local dir (single node, or shared) or an fsspec URI."""
    run_name: str = ""
    """Run name (STORAGE/RUN_NAME); rerunning with the same name resumes. Empty = autoencoder-<timestamp>."""
    keep_checkpoints: int = 2
    """Keep the last K checkpoints."""
    log_every: int = 50
    """Progress line and loss terms to MLflow every N steps."""

    def validate(self) -> None:
        super().validate()
        self.check_at_least(1, "layers_per_block", "latent_channels", "norm_num_groups", "resolution", "steps",
                            "batch_size", "scale_samples", "grid_scale", "disc_layers", "disc_channels")
        self.check_at_least(0, "l1_weight", "l2_weight", "kl_weight", "lpips_weight", "val_samples", "eval_every",
                            "disc_weight", "disc_start", "disc_lr")
        if self.l1_weight == 0 and self.l2_weight == 0:
            raise ConfigError("l1_weight and l2_weight are both 0: there would be no reconstruction loss")
        self._check_architecture()
        if self.discriminator and self.resolution < 2 ** (self.disc_layers + 1):
            raise ConfigError(f"disc_layers {self.disc_layers} need images of at least {2 ** (self.disc_layers + 1)} "
                              f"px, resolution is {self.resolution}")

    def _check_architecture(self) -> None:
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ConfigError(f"block_out_channels must be a non-empty list of positive ints, got "
                              f"{self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"norm_num_groups {self.norm_num_groups} does not divide block_out_channels {bad}")
        if self.resolution % self.downsample:
            raise ConfigError(f"resolution {self.resolution} is not divisible by the downsampling factor "
                              f"{self.downsample} of {len(self.block_out_channels)} levels")

    @property
    def downsample(self) -> int:
        """Pixels per latent side (from scratch; a fine-tuned model's own config decides otherwise)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_workers
