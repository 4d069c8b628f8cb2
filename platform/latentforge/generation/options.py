"""Option sections that `jobs/generate.py` and `jobs/evaluate.py` share: declared once, mixed into both configs.

Evaluation samples images the way generation does, so the sampler's options and the super-resolution
cascade's options mean the same in both stages; each section checks its own fields in `validate()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from latentforge.config import ConfigError, StageConfig, comma_list
from latentforge.diffusion.schedulers import canonical_sampler
from latentforge.generation.sampler import TEXT_STATE_MODES

DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class SamplingOptions(StageConfig):
    """How images are sampled: sampler, steps, guidance, seeds, batch, text states, device and dtype."""

    sampler: str = "ddim"
    """ddpm | ddim | dpmsolver++ (multistep) | euler."""
    steps: int = 50
    """Denoising steps."""
    guidance: float = 4.0
    """Classifier-free guidance scale (<= 1 disables the unconditional pass)."""
    negative_prompt: str = ""
    """Text for the unconditional branch of classifier-free guidance ('' = the empty caption)."""
    seed: int = 0
    """Base seed: prompt / caption i is sampled with seed + i, unless its --prompts .jsonl line gives a seed."""
    batch_size: int = 4
    """Prompts (images) per UNet batch."""
    text_states: str = "auto"
    """auto (what the data manifest records the model was trained on) | real_tokens (padded + attention mask)
    | full (all context_length states, SD-style)."""
    device: str = "auto"
    """cpu | cuda | auto (cuda when available)."""
    dtype: str = "fp32"
    """UNet/VAE/text-encoder dtype: fp32 | fp16 | bf16."""

    def validate(self) -> None:
        super().validate()
        try:
            self.sampler = canonical_sampler(self.sampler)
        except ValueError as exc:
            raise ConfigError(f"sampler: {exc}") from exc
        self.check_at_least(1, "steps", "batch_size")
        if self.text_states not in ("auto", *TEXT_STATE_MODES):
            raise ConfigError(f"text_states must be auto or one of {list(TEXT_STATE_MODES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}")


@dataclass
class UpscalerOptions(StageConfig):
    """The super-resolution cascade: upscaler exports, their noise level, steps and guidance."""

    upscaler: list[str] = field(default_factory=list)
    """Super-resolution stage export(s) in order, repeated or a comma list: with --model each upsamples the previous
    stage's images (a cascade); alone they take low-res images: generate upsamples --init-images, evaluate scores
    one export's SR fidelity on --eval-set's held-out images against bicubic (docs/super_resolution.md)."""
    noise_level: int = 20
    """Upscalers: noise-augmentation level of the low-res input, within the stage's trained [0, max_noise_level]
    (SD x4's default 20); higher hides more of the input's artefacts and more of its detail."""
    upscaler_steps: int | None = None
    """Upscalers: denoising steps of every super-resolution stage (default: --steps, which the base uses)."""
    upscaler_guidance: float | None = None
    """Upscalers: classifier-free guidance scale of every super-resolution stage (default: --guidance)."""

    def validate(self) -> None:
        super().validate()
        self.upscaler = comma_list(self.upscaler)  # built in code from one string, or from repeated flags
        self.check_at_least(0, "noise_level")
        self.check_at_least(1, "upscaler_steps")

    @property
    def upscalers(self) -> list[str]:
        return list(self.upscaler)


__all__ = ["DTYPES", "SamplingOptions", "UpscalerOptions"]
