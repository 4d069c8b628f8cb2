"""`jobs/generate.py` options (dataclass defaults < `jobs/configs/generate/*.yaml` < flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentforge.config import ConfigError
from latentforge.generation.options import SamplingOptions, UpscalerOptions
from latentforge.tracking import TrackingOptions


@dataclass
class GenerateConfig(SamplingOptions, UpscalerOptions, TrackingOptions):
    """Generate images from a trained export (txt2img, or img2img with --init-image)."""

    model: str = ""
    """Export dir (STORAGE/RUN/export), a training run dir holding export/, an MLflow run id, a diffusers folder
    made by jobs/export_model.py, or models:/NAME/VERSION (all lead to the same train export)."""
    prompts: str = ""
    """A prompt, or a file: .txt one prompt a line, .jsonl {"prompt": ..., "seed": ...} a line."""
    out: str = ""
    """Output dir: NNNNNN.png per prompt, grid.png, index.jsonl, manifest.json."""
    condition: list[str] = field(default_factory=list)
    """Class / scalar conditions NAME=VALUE (comma list), e.g. label=circle,score=6.5: checked against the
    labels / range the model's data recorded; conditions left out are null (docs/conditioning.md)."""
    init_image: str | None = None
    """img2img: the input image (its size is resized to the output size)."""
    strength: float = 0.75
    """img2img denoising strength in [0, 1]: 0 returns the input, 1 ignores it (txt2img)."""
    init_images: str | None = None
    """With --upscaler and no --model: a directory of low-res images, taken sorted by name (a generate output's
    grid.png skipped); --prompts gives one prompt per image or one for all."""
    height: int | None = None
    """Output height in px (default: the training resolution from the data manifest)."""
    width: int | None = None
    """Output width in px (default: the training resolution)."""
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

    def validate(self) -> None:
        super().validate()
        self.check_fraction("strength")
        self.check_at_least(1, "concurrency")
        self.check_at_least(8, "height", "width")

    def missing_options(self) -> list[str]:
        needed = ("prompts", "out") if self.upscaler else ("model", "prompts", "out")
        missing = [f"--{n}" for n in needed if not getattr(self, n)]
        if self.upscaler and not (self.model or self.init_images):
            missing.append("--model or --init-images")
        return missing

    def check_required(self) -> None:
        if self.init_images and (self.model or not self.upscaler):
            raise ConfigError("--init-images goes with --upscaler and without --model (a cascade starts from the base)")
        super().check_required()

    def settings(self) -> dict:
        """What fixes the pixels of an output; a rerun into the same dir must keep these."""
        return {"sampler": self.sampler, "steps": self.steps, "guidance": self.guidance,
                "negative_prompt": self.negative_prompt, "text_states": self.text_states,
                "init_image": self.init_image or "", "strength": self.strength if self.init_image else 1.0,
                **({"condition": ",".join(self.condition)} if self.condition else {})}


__all__ = ["GenerateConfig"]
