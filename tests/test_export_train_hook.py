"""Training's --export-formats: parsed and validated with the config, refused before training when the
data cannot be exported, and written beside the export afterwards."""

from __future__ import annotations

import pytest

from latentforge.config import ConfigError, parse_config
from latentforge.conversion.target import ExportRefused
from latentforge.trained_model import read_data_manifest
from latentforge.training.config import TrainConfig
from pipelines.export import export_formats, preflight
from tests.harness.tiny_export import build_tiny_export


def test_flag_parses_and_unknown_formats_are_refused() -> None:
    config = parse_config(TrainConfig, ["--data", "d", "--export-formats", "diffusers,single-file"])
    assert config.export_formats == ["diffusers", "single-file"]
    with pytest.raises(ConfigError, match="onnx"):
        TrainConfig(data="d", export_formats=["onnx"])


def test_preflight_refuses_what_could_not_be_exported(tmp_path) -> None:
    masked = read_data_manifest(str(build_tiny_export(tmp_path / "m", vae="autoencoder_kl").dir))
    with pytest.raises(ExportRefused, match="real_tokens"):
        preflight(masked, ["diffusers"], tracked=True)
    full = read_data_manifest(str(build_tiny_export(tmp_path / "f", vae="autoencoder_tiny", text_states="full").dir))
    preflight(full, ["diffusers", "mlflow"], tracked=True)
    with pytest.raises(ExportRefused, match="AutoencoderKL only"):
        preflight(full, ["single-file"], tracked=True)
    with pytest.raises(ExportRefused, match="no MLflow training run"):
        preflight(full, ["mlflow"], tracked=False)


def test_export_formats_write_beside_the_export(tmp_path) -> None:
    source = build_tiny_export(tmp_path / "run", vae="autoencoder_kl", resolution=32, text_states="full")
    outs = export_formats(str(source.dir), ["diffusers", "single-file"])
    assert outs == [str(tmp_path / "run" / "diffusers"), str(tmp_path / "run" / "model.safetensors")]
    assert (tmp_path / "run" / "diffusers" / "model_index.json").exists()
    assert (tmp_path / "run" / "model.safetensors").stat().st_size > 1000
