"""`make demo` runs jobs/demo.py without --preset: DemoConfig's defaults are what jobs/configs/demo/default.yaml
documents (and measured), so the two must not drift apart."""

from __future__ import annotations

from jobs import _bootstrap
from latentforge.config import config_to_dict, parse_config
from latentforge.demo.config import DemoConfig


def test_make_demo_runs_what_the_default_preset_says():
    preset = parse_config(DemoConfig, ["--preset", "default"], preset_dir=_bootstrap.PRESETS / "demo")
    plain = parse_config(DemoConfig, [], preset_dir=_bootstrap.PRESETS / "demo")
    assert config_to_dict(plain) == config_to_dict(preset)
    assert (plain.unet_preset, plain.steps) == ("tiny-pooled", 2200)
