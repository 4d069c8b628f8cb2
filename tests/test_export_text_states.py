"""The text-state convention is a recorded precompute choice that training, sampling and export follow."""

from __future__ import annotations

import numpy as np
import pytest

from latentforge.config import load_yaml
from latentforge.trained_model import load_export
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from latentforge.precompute.config import PrecomputeConfig
from latentforge.precompute.encode import PrecomputeEncoder
from latentforge.training.data import collate
from tests.harness.tiny_export import build_tiny_export


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return save_tiny_clip_checkpoint(tmp_path_factory.mktemp("clip") / "tiny.safetensors")


def _encoded(clip: str, text_states: str) -> tuple[dict, tuple]:
    config = PrecomputeConfig(vae_type="patchify", text_encoder="lf-tiny-clip", text_encoder_weights=clip,
                              text_layer="last", resolution=16, dtype="fp32", text_states=text_states)
    encoder = PrecomputeEncoder(config, device="cpu")
    batch = {"key": np.array(["a", "b"]), "caption": np.array(["a red circle", "two blue squares on grass"]),
             "status": np.array(["ok", "ok"]), "image": np.zeros((2, 16, 16, 3), np.uint8)}
    return encoder.encode_batch(batch), encoder.empty_caption()


def test_full_stores_all_context_states_and_trains_unmasked(clip) -> None:
    import torch

    real, real_empty = _encoded(clip, "real_tokens")
    full, full_empty = _encoded(clip, "full")
    assert real["text_length"].tolist() == [5, 7] and real_empty[2] == 2
    assert full["text_length"].tolist() == [77, 77] and full_empty[2] == 77 and full_empty[0].shape == (77, 32)
    np.testing.assert_array_equal(full["text"], real["text"])  # same states; only how many are kept differs
    # training's batches: full rows use every position, so the mask is all ones (what the pipeline feeds)
    rows = [{"key": k, "latent": torch.zeros(12, 8, 8), "text": torch.from_numpy(t[:n])}
            for k, t, n in zip("ab", full["text"], full["text_length"])]
    assert collate(rows)["mask"].all() and collate(rows)["text"].shape == (2, 77, 32)


def test_sampling_follows_the_recorded_convention(tmp_path) -> None:
    full = build_tiny_export(tmp_path / "full", vae="patchify", text_states="full")
    legacy = build_tiny_export(tmp_path / "legacy", vae="patchify")
    assert load_export(str(full.dir)).sampler().text_states == "full"
    assert load_export(str(legacy.dir)).sampler().text_states == "real_tokens"
    assert load_export(str(full.dir)).sampler(text_states="real_tokens").text_states == "real_tokens"


def test_sd_presets_use_the_pipeline_convention_and_the_default_does_not() -> None:
    from tests.harness.job_process import REPO

    for name in ("sd15", "sd2"):
        assert load_yaml(REPO / "jobs" / "configs" / "precompute" / f"{name}.yaml")["text_states"] == "full"
    assert PrecomputeConfig().text_states == "real_tokens"
    from latentforge.config import ConfigError, parse_config

    assert parse_config(PrecomputeConfig, ["--text-states", "full"]).text_states == "full"
    with pytest.raises((ConfigError, SystemExit)):
        parse_config(PrecomputeConfig, ["--text-states", "masked"])
