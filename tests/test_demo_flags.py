"""The demo's real-model flags reach the precompute job unchanged ("one flag away")."""

from __future__ import annotations

from jobs import _bootstrap
from jobs.demo import Paths, stage_argv
from latentforge.config import parse_config
from latentforge.demo.config import DemoConfig
from latentforge.precompute.config import PrecomputeConfig


def test_real_model_ids_flow_into_the_precompute_command_line(tmp_path) -> None:
    demo = parse_config(DemoConfig, ["--out", str(tmp_path), "--vae-type", "autoencoder_kl",
                                     "--vae", "stabilityai/sd-vae-ft-mse", "--text-encoder", "ViT-B-32",
                                     "--text-encoder-weights", "laion2b_s34b_b79k"])
    argv = stage_argv(demo, Paths(demo.out), clip_weights=demo.text_encoder_weights)["precompute_latents"]
    config = parse_config(PrecomputeConfig, argv, preset_dir=_bootstrap.PRESETS / "precompute")
    assert (config.vae_type, config.vae) == ("autoencoder_kl", "stabilityai/sd-vae-ft-mse")
    assert (config.text_encoder, config.text_encoder_weights) == ("ViT-B-32", "laion2b_s34b_b79k")


def test_default_demo_uses_the_weight_free_models(tmp_path) -> None:
    demo = parse_config(DemoConfig, ["--out", str(tmp_path)])
    argv = stage_argv(demo, Paths(demo.out), clip_weights=str(tmp_path / "lf-tiny-clip.safetensors"))
    config = parse_config(PrecomputeConfig, argv["precompute_latents"], preset_dir=_bootstrap.PRESETS / "precompute")
    assert config.vae_type == "patchify" and config.text_encoder == "lf-tiny-clip"
