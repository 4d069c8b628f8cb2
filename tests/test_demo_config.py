"""DemoConfig on the StageConfig pattern: range checks in validate(), the weights a real model needs in
missing_options(), so `--print-config` shows an incomplete command line and a run refuses it."""

from __future__ import annotations

import pytest

from jobs import _bootstrap
from jobs.demo import main
from latentforge.config import ConfigError, parse_config
from latentforge.demo.adherence import wilson_interval
from latentforge.demo.config import DemoConfig


def test_ranges_are_checked_when_the_config_is_built() -> None:
    with pytest.raises(ConfigError, match="prompts must be >= 1"):
        DemoConfig(prompts=0)
    with pytest.raises(ConfigError, match="autoencoder_steps must be >= 0"):
        DemoConfig(autoencoder_steps=-1)
    with pytest.raises(ConfigError, match="upscale_to 24 must be a multiple of resolution 16"):
        DemoConfig(upscale_to=24)


def test_real_model_weights_are_required_options_not_validation_errors(capsys) -> None:
    config = DemoConfig(vae_type="autoencoder_tiny", text_encoder="ViT-B-32")  # builds: --print-config shows it
    assert [flag.split()[0] for flag in config.missing_options()] == ["--vae", "--text-encoder-weights"]
    with pytest.raises(ConfigError, match="missing required option"):
        config.check_required()
    assert main(["--vae-type", "autoencoder_tiny", "--print-config"]) == 0
    assert main(["--vae-type", "autoencoder_tiny", "--out", "unused"]) == 2  # refused before any stage runs
    assert "--vae (a diffusers directory" in capsys.readouterr().err
    assert DemoConfig().missing_options() == []


def test_the_default_measures_adherence_to_within_5_points() -> None:
    """At the shares the README states (>= 80 %), the default prompt count's 95 % interval spans at most
    10 points (+-5; Wilson's is a little lopsided: at 80 % of 288 it is 75.0 to 84.2)."""
    prompts = parse_config(DemoConfig, [], preset_dir=_bootstrap.PRESETS / "demo").prompts
    for share in (0.8, 0.85, 0.9, 0.95):
        low, high = wilson_interval(share, prompts)
        assert high - low <= 0.10, (share, prompts)
