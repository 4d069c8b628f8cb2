"""The command line of every demo stage: exactly what a user would type (README), built from `DemoConfig`.

`jobs/demo.py` runs each through the stage's own `main(argv)`, the entry point `ray job submit` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentforge.demo.config import DemoConfig
from latentforge.demo.report import AUTOENCODER_RUN, TRAIN_RUN
from latentforge.demo.report import DemoPaths as Paths

def ingest_argv(config: DemoConfig, paths: Paths) -> list[str]:
    return ["--input", str(paths.urls), "--output", str(paths.shards), "--url-col", "url",
            "--caption-col", "caption", "--samples-per-shard", str(config.samples_per_shard),
            "--image-size", str(config.image_size), "--resize-mode", "no", "--encode-format", "png",
            "--encode-quality", "1", "--retries", "0", "--timeout-s", "10", "--allow-private-network",
            "--no-progress", "--run-name", "demo-ingest"]

def autoencoder_argv(config: DemoConfig, paths: Paths) -> list[str]:
    """The demo's own AutoencoderKL at the training resolution (jobs/configs/train_autoencoder/<preset>.yaml)."""
    steps = ["--steps", str(config.autoencoder_steps)] if config.autoencoder_steps else []
    return ["--preset", config.autoencoder_preset, "--data", str(paths.shards), "--resolution", str(config.resolution),
            *steps, "--seed", str(config.seed), "--storage-path", str(paths.autoencoder), "--run-name", AUTOENCODER_RUN]

def precompute_argv(config: DemoConfig, paths: Paths, clip_weights: str | None) -> list[str]:
    if config.vae_type == "patchify":
        vae = ["--vae-type", "patchify"]
    else:
        vae = ["--vae-type", config.vae_type, "--vae", config.vae or str(paths.autoencoder_export)]
    weights = ["--text-encoder-weights", clip_weights] if clip_weights else []
    return ["--preset", "tiny", "--input", str(paths.shards), "--output", str(paths.latents), *vae,
            "--text-encoder", config.text_encoder, *weights, "--text-layer", config.text_layer,
            "--text-states", config.text_states, "--resolution", str(config.resolution), "--no-progress",
            "--run-name", "demo-precompute"]

def train_argv(config: DemoConfig, paths: Paths) -> list[str]:
    from latentforge.demo.scenes import eval_prompts

    every_pair = eval_prompts(24)  # colour i % 6, position (i // 6) % 4
    eval_set = [every_pair[i] for i in (0, 7, 14, 21, 4, 11)]  # 6 colours, every position
    export = ["--export-formats", "diffusers"] if config.exports_to_diffusers else []
    return ["--preset", "tiny", "--data", str(paths.latents), "--unet", config.unet_preset, "--steps", str(config.steps),
            "--batch-size", str(config.batch_size), "--lr", str(config.lr), "--num-workers", str(config.num_workers),
            "--storage-path", str(paths.checkpoints), "--run-name", TRAIN_RUN, "--seed", str(config.seed),
            "--checkpoint-every", str(config.checkpoint_every), "--eval-every", str(config.eval_every),
            "--eval-prompts", ",".join(eval_set), "--eval-steps", "20", "--val-samples", "64", *export]

def stage_argv(config: DemoConfig, paths: Paths, clip_weights: str | None) -> dict[str, list[str]]:
    """The command line of every stage, in run order: exactly what a user would type (see README)."""
    stages = {"download_images": ingest_argv(config, paths)}
    if config.trains_autoencoder:
        stages["train_autoencoder"] = autoencoder_argv(config, paths)
    stages["precompute_latents"] = precompute_argv(config, paths, clip_weights)
    stages["train"] = train_argv(config, paths)
    return {stage: args + tracking_flags(config) for stage, args in stages.items()}

def tracking_flags(config: DemoConfig) -> list[str]:
    return [] if config.mlflow else ["--no-mlflow"]

def generate_argv(config: DemoConfig, model: str, prompts: Path, out: Path, run_name: str) -> list[str]:
    return ["--model", model, "--prompts", str(prompts), "--out", str(out),
            "--sampler", config.sampler, "--steps", str(config.sample_steps), "--guidance", str(config.guidance),
            "--seed", str(config.seed), "--batch-size", "16", "--no-progress", "--run-name", run_name,
            *tracking_flags(config)]

def autoencoder_settings(config: DemoConfig, argv: list[str]) -> dict[str, Any]:
    """What decides the demo autoencoder's weights: the generated scenes and its stage's command line."""
    scenes = {name: getattr(config, name) for name in ("rows", "seed", "image_size", "broken_every",
                                                       "samples_per_shard")}
    return {"scenes": scenes, "argv": [arg for arg in argv if arg != "--no-mlflow"]}
