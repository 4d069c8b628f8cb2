"""The command line of every demo stage: exactly what a user would type (README), built from `DemoConfig`.

`jobs/demo.py` runs each through its job's own `main(argv)`, the entry point `ray job submit` runs;
`STAGE_JOBS` names the job of a stage whose name is not its job's (two ingest runs, two train runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentforge.demo.config import DemoConfig
from latentforge.demo.report import AUTOENCODER_RUN, TRAIN_RUN, UPSCALER_RUN
from latentforge.demo.report import DemoPaths as Paths

STAGE_JOBS = {"ingest_heldout": "download_images", "train_upscaler": "train"}


def job_of(stage: str) -> str:
    """The jobs/<name>.py that runs `stage`."""
    return STAGE_JOBS.get(stage, stage)


def ingest_argv(config: DemoConfig, urls: Path, shards: Path, run_name: str) -> list[str]:
    return ["--input", str(urls), "--output", str(shards), "--url-col", "url",
            "--caption-col", "caption", "--samples-per-shard", str(config.samples_per_shard),
            "--image-size", str(config.image_size), "--resize-mode", "no", "--encode-format", "png",
            "--encode-quality", "1", "--retries", "0", "--timeout-s", "10", "--allow-private-network",
            "--no-progress", "--run-name", run_name]


def autoencoder_argv(config: DemoConfig, paths: Paths) -> list[str]:
    """The demo's own AutoencoderKL at the training resolution (jobs/configs/train_autoencoder/<preset>.yaml)."""
    steps = ["--steps", str(config.autoencoder_steps)] if config.autoencoder_steps else []
    return ["--preset", config.autoencoder_preset, "--data", str(paths.shards), "--resolution", str(config.resolution),
            *steps, "--seed", str(config.seed), "--storage-path", str(paths.autoencoder), "--run-name", AUTOENCODER_RUN]


def precompute_argv(config: DemoConfig, paths: Paths, clip_weights: str | None) -> list[str]:
    """One pass over the shards; with an upscaler, both resolutions (pixels kept for the upscaler's)."""
    if config.vae_type == "patchify":
        vae = ["--vae-type", "patchify"]
    else:
        vae = ["--vae-type", config.vae_type, "--vae", config.vae or str(paths.autoencoder_export)]
    weights = ["--text-encoder-weights", clip_weights] if clip_weights else []
    sizes = (["--resolutions", f"{config.resolution},{config.upscale_to}", "--store-pixels"] if config.upscale_to
             else ["--resolution", str(config.resolution)])
    return ["--preset", "tiny", "--input", str(paths.shards), "--output", str(paths.latents), *vae,
            "--text-encoder", config.text_encoder, *weights, "--text-layer", config.text_layer,
            "--text-states", config.text_states, *sizes, "--no-progress", "--run-name", "demo-precompute"]


def latent_dir(config: DemoConfig, paths: Paths, resolution: int) -> Path:
    """The precompute dataset of one resolution (a --resolutions run writes one sub-directory per size)."""
    from latentforge.precompute.config import resolution_dir

    return paths.latents / resolution_dir(resolution) if config.upscale_to else paths.latents


def train_argv(config: DemoConfig, paths: Paths) -> list[str]:
    from latentforge.demo.scenes import eval_prompts

    every_pair = eval_prompts(24)  # colour i % 6, position (i // 6) % 4
    eval_set = [every_pair[i] for i in (0, 7, 14, 21, 4, 11)]  # 6 colours, every position
    export = ["--export-formats", "diffusers"] if config.exports_to_diffusers else []
    return ["--preset", "tiny", "--data", str(latent_dir(config, paths, config.resolution)), "--unet",
            config.unet_preset, "--steps", str(config.steps), "--batch-size", str(config.batch_size), "--lr",
            str(config.lr), "--num-workers", str(config.num_workers), "--storage-path", str(paths.checkpoints),
            "--run-name", TRAIN_RUN, "--seed", str(config.seed), "--checkpoint-every", str(config.checkpoint_every),
            "--eval-every", str(config.eval_every), "--eval-prompts", ",".join(eval_set), "--eval-steps", "20",
            "--val-samples", "64", *export]


def upscaler_argv(config: DemoConfig, paths: Paths) -> list[str]:
    """The super-resolution stage: the same train job, `--preset tiny-sr` (`--stage upscaler`, the residual
    recipe), on the upscale_to dataset."""
    return ["--preset", "tiny-sr", "--data", str(latent_dir(config, paths, config.upscale_to)),
            "--lowres-factor", str(config.upscale_to // config.resolution),
            "--max-noise-level", str(config.sr_max_noise_level), "--steps", str(config.sr_steps),
            "--batch-size", str(config.sr_batch_size), "--lr", str(config.sr_lr), "--num-workers",
            str(config.num_workers), "--storage-path", str(paths.checkpoints), "--run-name", UPSCALER_RUN,
            "--seed", str(config.seed), "--checkpoint-every", str(config.sr_steps)]


def stage_argv(config: DemoConfig, paths: Paths, clip_weights: str | None) -> dict[str, list[str]]:
    """The command line of every stage, in run order: exactly what a user would type (see README)."""
    stages = {"download_images": ingest_argv(config, paths.urls, paths.shards, "demo-ingest")}
    if config.upscale_to:
        stages["ingest_heldout"] = ingest_argv(config, paths.heldout_urls, paths.heldout_shards, "demo-ingest-heldout")
    if config.trains_autoencoder:
        stages["train_autoencoder"] = autoencoder_argv(config, paths)
    stages["precompute_latents"] = precompute_argv(config, paths, clip_weights)
    stages["train"] = train_argv(config, paths)
    if config.upscale_to:
        stages["train_upscaler"] = upscaler_argv(config, paths)
    return {stage: args + tracking_flags(config) for stage, args in stages.items()}


def tracking_flags(config: DemoConfig) -> list[str]:
    return [] if config.mlflow else ["--no-mlflow"]


def generate_argv(config: DemoConfig, model: str, prompts: Path, out: Path, run_name: str,
                  upscaler: str | None = None) -> list[str]:
    """Sample the adherence prompts with a base model, or with a cascade (base -> upscaler) when given one."""
    cascade = ["--upscaler", upscaler, "--noise-level", str(config.sr_noise_level)] if upscaler else []
    return ["--model", model, *cascade, "--prompts", str(prompts), "--out", str(out),
            "--sampler", config.sampler, "--steps", str(config.sample_steps), "--guidance", str(config.guidance),
            "--seed", str(config.seed), "--batch-size", "16", "--no-progress", "--run-name", run_name,
            *tracking_flags(config)]


def sr_fidelity_argv(config: DemoConfig, paths: Paths, upscaler: str) -> list[str]:
    """The upscaler's PSNR / SSIM against bicubic on the held-out scenes (jobs/configs/evaluate/sr.yaml)."""
    return ["--preset", "sr", "--upscaler", upscaler, "--eval-set", str(paths.heldout_shards),
            "--num-samples", str(config.heldout), "--noise-level", str(config.sr_noise_level),
            "--steps", str(config.sr_sample_steps), "--guidance", "1", "--seed", str(config.seed), "--out", str(paths.sr_fidelity),
            "--run-name", "demo-sr-fidelity", *tracking_flags(config)]


def autoencoder_settings(config: DemoConfig, argv: list[str]) -> dict[str, Any]:
    """What decides the demo autoencoder's weights: the generated scenes and its stage's command line."""
    scenes = {name: getattr(config, name) for name in ("rows", "seed", "image_size", "broken_every",
                                                       "samples_per_shard")}
    return {"scenes": scenes, "argv": [arg for arg in argv if arg != "--no-mlflow"]}
