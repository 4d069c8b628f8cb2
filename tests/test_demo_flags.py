"""The demo's real-model flags reach the precompute job unchanged ("one flag away")."""

from __future__ import annotations

from jobs import _bootstrap
from latentforge.demo.commands import Paths, stage_argv
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


def _parsed_stages(tmp_path, *flags: str) -> dict:
    from latentforge.autoencoder.config import AutoencoderTrainConfig
    from latentforge.training.config import TrainConfig

    demo = parse_config(DemoConfig, ["--out", str(tmp_path), *flags], preset_dir=_bootstrap.PRESETS / "demo")
    argv = stage_argv(demo, Paths(demo.out), clip_weights=str(tmp_path / "lf-tiny-clip.safetensors"))
    configs = {"precompute_latents": (PrecomputeConfig, "precompute"), "train": (TrainConfig, "train"),
               "train_autoencoder": (AutoencoderTrainConfig, "train_autoencoder"),
               "train_upscaler": (TrainConfig, "train")}
    return {stage: parse_config(configs[stage][0], args, preset_dir=_bootstrap.PRESETS / configs[stage][1])
            for stage, args in argv.items() if stage in configs}


def test_default_demo_trains_its_autoencoder_and_exports_to_diffusers(tmp_path) -> None:
    stages = _parsed_stages(tmp_path)
    autoencoder, precompute, train = stages["train_autoencoder"], stages["precompute_latents"], stages["train"]
    assert list(stages) == ["train_autoencoder", "precompute_latents", "train", "train_upscaler"]  # in run order
    assert autoencoder.data == str(Paths(str(tmp_path)).shards) and autoencoder.resolution == precompute.resolution
    assert (precompute.vae_type, precompute.vae) == ("autoencoder_kl", str(Paths(str(tmp_path)).autoencoder_export))
    assert precompute.text_states == "full" and precompute.text_encoder == "lf-tiny-clip"
    assert train.export_formats == ["diffusers"]


def test_patchify_stays_an_option_without_an_autoencoder_or_a_diffusers_export(tmp_path) -> None:
    stages = _parsed_stages(tmp_path, "--vae-type", "patchify")
    assert "train_autoencoder" not in stages
    assert stages["precompute_latents"].vae_type == "patchify" and stages["train"].export_formats == []


def test_the_family_trains_base_and_upscaler_from_one_precompute_run(tmp_path) -> None:
    """One --resolutions pass feeds the 16 px base and the 16 -> 32 px upscaler (its sub-directories)."""
    stages = _parsed_stages(tmp_path)
    precompute, base, upscaler = stages["precompute_latents"], stages["train"], stages["train_upscaler"]
    assert precompute.resolutions == [16, 32] and precompute.store_pixels
    assert base.data == str(Paths(str(tmp_path)).latents / "16px") and base.stage == "base"
    assert upscaler.data == str(Paths(str(tmp_path)).latents / "32px") and upscaler.stage == "upscaler"
    assert upscaler.lowres_factor == 2 and upscaler.run_name != base.run_name


def test_without_an_upscaler_the_demo_is_the_base_alone(tmp_path) -> None:
    stages = _parsed_stages(tmp_path, "--upscale-to", "0")
    assert "train_upscaler" not in stages and stages["precompute_latents"].resolutions == []
    assert stages["train"].data == str(Paths(str(tmp_path)).latents)
