"""`jobs/generate.py` options (dataclass defaults < `jobs/configs/generate/*.yaml` < flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentforge.config import comma_list
from latentforge.diffusion.schedulers import canonical_sampler
from latentforge.generation.sampler import TEXT_STATE_MODES
from latentforge.tracking import TrackingOptions

DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class GenerateConfig(TrackingOptions):
    """Generate images from a trained export (txt2img, or img2img with --init-image)."""

    model: str = ""
    """Export dir (STORAGE/RUN/export), a training run dir holding export/, an MLflow run id, a diffusers folder
    made by jobs/export_model.py, or models:/NAME/VERSION (all lead to the same train export)."""
    prompts: str = ""
    """A prompt, or a file: .txt one prompt a line, .jsonl {"prompt": ..., "seed": ...} a line."""
    out: str = ""
    """Output dir: NNNNNN.png per prompt, grid.png, index.jsonl, manifest.json."""
    sampler: str = "ddim"
    """ddpm | ddim | dpmsolver++ (multistep) | euler."""
    steps: int = 50
    """Denoising steps."""
    guidance: float = 4.0
    """Classifier-free guidance scale (<= 1 disables the unconditional pass)."""
    seed: int = 0
    """Base seed: prompt i uses seed + i unless its jsonl line gives one."""
    negative_prompt: str = ""
    """Text for the unconditional branch of classifier-free guidance ('' = the empty caption)."""
    condition: list[str] = field(default_factory=list)
    """Class / scalar conditions NAME=VALUE (comma list), e.g. label=circle,score=6.5: checked against the
    labels / range the model's data recorded; conditions left out are null (docs/conditioning.md)."""
    init_image: str | None = None
    """img2img: the input image (its size is resized to the output size)."""
    strength: float = 0.75
    """img2img denoising strength in [0, 1]: 0 returns the input, 1 ignores it (txt2img)."""
    upscaler: list[str] = field(default_factory=list)
    """Super-resolution stage export(s) in order, repeated or a comma list: with --model each upsamples the previous
    stage's images (a cascade), alone they upsample --init-images (docs/super_resolution.md)."""
    init_images: str | None = None
    """With --upscaler and no --model: a directory of low-res images, taken sorted by name (a generate output's
    grid.png skipped); --prompts gives one prompt per image or one for all."""
    noise_level: int = 20
    """Upscalers: noise-augmentation level of the low-res input, within the stage's trained [0, max_noise_level]
    (SD x4's default 20); higher hides more of the input's artefacts and more of its detail."""
    upscaler_steps: int | None = None
    """Upscalers: denoising steps of every super-resolution stage (default: --steps, which the base uses)."""
    upscaler_guidance: float | None = None
    """Upscalers: classifier-free guidance scale of every super-resolution stage (default: --guidance)."""
    batch_size: int = 4
    """Prompts per UNet batch."""
    height: int | None = None
    """Output height in px (default: the training resolution from the data manifest)."""
    width: int | None = None
    """Output width in px (default: the training resolution)."""
    text_states: str = "auto"
    """auto (what the data manifest records the model was trained on) | real_tokens (padded + attention mask)
    | full (all context_length states, SD-style)."""
    device: str = "auto"
    """cpu | cuda | auto (cuda when available)."""
    dtype: str = "fp32"
    """UNet/VAE/text-encoder dtype: fp32 | fp16 | bf16."""
    ray: bool = False
    """Generate through Ray Data (an actor pool of samplers); for large prompt lists."""
    concurrency: int = 1
    """Ray mode: number of sampler actors."""
    num_gpus_per_actor: float | None = None
    """Ray mode: GPUs per sampler actor (default: 1 when the cluster has GPUs, else 0)."""
    num_cpus_per_actor: float = 1.0
    """Ray mode: CPUs per sampler actor."""
    grid_max: int = 64
    """At most this many images (the first ones) on the contact sheet."""
    run_name: str | None = None
    """MLflow run name (default: generate-<out dir name>)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        self.sampler = canonical_sampler(self.sampler)
        self.upscaler = comma_list(self.upscaler)
        if self.steps < 1 or (self.upscaler_steps is not None and self.upscaler_steps < 1):
            raise ValueError("steps and upscaler_steps must be >= 1")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("batch_size and concurrency must be >= 1")
        if self.text_states not in ("auto", *TEXT_STATE_MODES):
            raise ValueError(f"text_states must be auto or one of {list(TEXT_STATE_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise ValueError(f"{name} must be >= 8")

    def check_required(self) -> None:
        if self.init_images and (self.model or not self.upscaler):
            raise ValueError("--init-images goes with --upscaler and without --model (a cascade starts from the base)")
        needed = ("prompts", "out") if self.upscaler else ("model", "prompts", "out")
        missing = [f"--{n}" for n in needed if not getattr(self, n)]
        if self.upscaler and not (self.model or self.init_images):
            missing.append("--model or --init-images")
        if missing:
            raise ValueError(f"missing required option(s): {', '.join(missing)}")

    @property
    def upscalers(self) -> list[str]:
        return list(self.upscaler)

    def settings(self) -> dict:
        """What fixes the pixels of an output; a rerun into the same dir must keep these."""
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance,
                "negative_prompt": self.negative_prompt, "text_states": self.text_states,
                "init_image": self.init_image or "", "strength": self.strength if self.init_image else 1.0,
                **({"condition": ",".join(self.condition)} if self.condition else {})}


__all__ = ["GenerateConfig", "DTYPES"]
