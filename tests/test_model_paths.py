"""A model path that is not there where the job runs is one clear line and exit 2, not a traceback.

The README tour once passed `--text-encoder-weights demo_output/models/...` to a job submitted
with `--working-dir .`: Ray's copy of the working dir has no gitignored files, so the job died in
open_clip with a raw FileNotFoundError. The loaders now name the path and the fix.
"""

from __future__ import annotations

import pytest

from latentforge.config import ConfigError
from latentforge.models.text_encoder import TINY_CLIP_NAME, load_text_encoder
from latentforge.models.vae import ModelNotFoundError, VaeSpec, load_vae
from tests.harness.ingest_shards import write_ingest_shards


def _one_line_naming(message: str, path: str) -> None:
    assert "\n" not in message and path in message and "absolute path" in message


def test_missing_text_encoder_checkpoint_is_a_config_error(tmp_path) -> None:
    missing = str(tmp_path / "models" / "lf-tiny-clip.safetensors")
    with pytest.raises(ModelNotFoundError) as caught:
        load_text_encoder(TINY_CLIP_NAME, missing)
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, FileNotFoundError)
    _one_line_naming(str(caught.value), missing)


@pytest.mark.parametrize("vae_type", ["autoencoder_kl", "autoencoder_tiny"])
def test_missing_local_vae_directory_is_a_config_error(tmp_path, vae_type) -> None:
    missing = str(tmp_path / "models" / "vae")  # absolute, 3+ parts: not to be read as a hub id
    with pytest.raises(ModelNotFoundError) as caught:
        load_vae(VaeSpec(type=vae_type, id=missing))
    _one_line_naming(str(caught.value), missing)


@pytest.mark.slow
def test_precompute_job_with_a_missing_model_exits_2_with_one_line(ray_session, tmp_path, capsys,
                                                                   monkeypatch) -> None:
    from jobs.precompute_latents import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    shards = write_ingest_shards(tmp_path / "shards", shard_sizes=(4,))
    missing = str(tmp_path / "models" / "lf-tiny-clip.safetensors")
    rc = main(["--preset", "tiny", "--input", str(shards.dir), "--output", str(tmp_path / "latents"),
               "--text-encoder-weights", missing, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("precompute:")]
    _one_line_naming(line, missing)
    assert not (tmp_path / "latents" / "manifest.json").exists()
