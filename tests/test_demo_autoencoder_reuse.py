"""The demo trains its autoencoder once per scene set and settings: a finished export of the same
scenes and the same stage command line is reused; anything else is removed and trained again."""

from __future__ import annotations

import json

import pytest

from jobs.demo import SETTINGS_NAME, StageFailed, train_or_reuse_autoencoder
from latentforge.demo.commands import Paths, autoencoder_settings, stage_argv
from latentforge.config import parse_config
from latentforge.demo.config import DemoConfig
from tests.harness.tiny_models import save_tiny_autoencoder_kl


def _finished_autoencoder(config: DemoConfig, paths: Paths) -> list[str]:
    """A real AutoencoderKL export where the demo's autoencoder stage writes it, with its settings record."""
    from diffusers import AutoencoderKL

    from latentforge.autoencoder.export_writer import write_autoencoder_export

    vae = AutoencoderKL.from_pretrained(save_tiny_autoencoder_kl(paths.root / "tiny-vae", shift_factor=None))
    write_autoencoder_export(str(paths.autoencoder_export), vae, 0.7, config={}, data_dir=str(paths.shards),
                             data_digest="0" * 64, step=7, mlflow_run_id=None,
                             extra={"metrics": {"psnr": 31.25, "ssim": 0.96}})
    argv = stage_argv(config, paths, clip_weights=None)["train_autoencoder"]
    (paths.autoencoder / SETTINGS_NAME).write_text(json.dumps(autoencoder_settings(config, argv)))
    return argv


def test_the_same_scenes_and_settings_reuse_the_finished_autoencoder(tmp_path) -> None:
    config = parse_config(DemoConfig, ["--out", str(tmp_path)])
    paths = Paths(config.out)
    argv = _finished_autoencoder(config, paths)
    timings: dict[str, float] = {}
    # --no-mlflow does not change the weights: still the same autoencoder.
    record = train_or_reuse_autoencoder(config, paths, [*argv, "--no-mlflow"], timings)
    assert record == {"export": str(paths.autoencoder_export), "psnr": 31.25, "ssim": 0.96, "step": 7,
                      "reused": True}
    assert timings == {}  # no stage ran


@pytest.mark.parametrize("change", [["--autoencoder-steps", "5"], ["--rows", "100"], ["--seed", "3"]])
def test_other_scenes_or_settings_train_a_new_autoencoder(tmp_path, change) -> None:
    paths = Paths(str(tmp_path))
    _finished_autoencoder(parse_config(DemoConfig, ["--out", str(tmp_path)]), paths)
    config = parse_config(DemoConfig, ["--out", str(tmp_path), *change])
    timings: dict[str, float] = {}
    # The stage runs (and here stops at once: there are no ingest shards), after the old run is removed.
    with pytest.raises(StageFailed) as failed:
        train_or_reuse_autoencoder(config, paths, stage_argv(config, paths, None)["train_autoencoder"], timings)
    assert (failed.value.stage, failed.value.code) == ("train_autoencoder", 2)
    assert "train_autoencoder" in timings and not paths.autoencoder.exists()
