"""Super-resolution data: precompute's stored pixels, low-res pairs per (key, epoch), noise augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.manifest import ManifestError
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from latentforge.precompute.config import PrecomputeConfig
from latentforge.precompute.encode import PrecomputeEncoder
from latentforge.precompute.stage import pixels_record, plan_run
from latentforge.precompute.writer import ShardWriter
from latentforge.tar_samples import iter_shard
from latentforge import formats
from latentforge.upscaler import conditioning
from latentforge.upscaler.degradation import Degradation, bicubic_upsample, lowres_pixels
from tests.harness.ingest_shards import write_ingest_shards


def _images(n: int = 4, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _config(tmp_path, **kw) -> PrecomputeConfig:
    clip = save_tiny_clip_checkpoint(tmp_path / "clip.safetensors")
    return PrecomputeConfig(vae_type="patchify", text_encoder="lf-tiny-clip", text_encoder_weights=clip,
                            text_layer="last", resolution=16, dtype="fp32", **kw)


def test_store_pixels_keeps_the_preprocessed_image_in_the_shard(tmp_path) -> None:
    images = _images(2, 16)
    batch = {"key": np.array(["a", "b"]), "caption": np.array(["x", "y"], dtype=object),
             "status": np.array(["ok", "ok"]), "image": images, "meta": np.array(['{"key": "k"}'] * 2)}
    assert "image" not in PrecomputeEncoder(_config(tmp_path)).encode_batch(dict(batch))
    out = PrecomputeEncoder(_config(tmp_path, store_pixels=True)).encode_batch(dict(batch))
    writer = ShardWriter(str(tmp_path / "out"), "00000", "fp32")
    for i in range(2):
        writer.add({k: v[i] for k, v in out.items()})
    writer.expected = 2
    writer.finish()
    members = dict(iter_shard(str(tmp_path / "out" / "00000.tar")))
    np.testing.assert_array_equal(formats.decode_npy(members["b"]["pixels.npy"]), images[1])
    assert pixels_record(_config(tmp_path, store_pixels=True))["size"] == [16, 16]
    assert pixels_record(_config(tmp_path)) == {}


def test_resume_refuses_to_mix_outputs_with_and_without_pixels(tmp_path) -> None:
    from latentforge.config import config_to_dict
    from latentforge.manifest import Manifest, write_manifest

    write_ingest_shards(tmp_path / "in", shard_sizes=(2,))
    config = _config(tmp_path, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    old = config_to_dict(config)
    old.pop("store_pixels")  # an output written before the flag existed resumes without it
    write_manifest(str(tmp_path / "out"), Manifest(stage="precompute", config=old))
    assert len(plan_run(config).pending) == 1
    config.store_pixels = True
    with pytest.raises(ManifestError, match="store_pixels"):
        plan_run(config)


def test_degradation_is_a_pure_function_of_seed_key_and_epoch() -> None:
    image = _images(1, 32)[0]
    plain = Degradation(factor=2)
    np.testing.assert_array_equal(plain.apply(image, "k", 0), plain.apply(image, "k", 7))  # nothing random
    expected = np.asarray(Image.fromarray(image).resize((16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(plain.apply(image, "k", 0), expected)
    noisy = Degradation(factor=2, blur=2.0, jpeg=20, seed=3)
    a = noisy.apply(image, "k", 0)
    np.testing.assert_array_equal(a, Degradation(factor=2, blur=2.0, jpeg=20, seed=3).apply(image, "k", 0))
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, noisy.apply(image, "k", 1))
    assert not np.array_equal(a, noisy.apply(image, "other", 0))
    with pytest.raises(ValueError, match="not divisible"):
        Degradation(factor=3).apply(image, "k", 0)
    with pytest.raises(ValueError, match="jpeg"):
        Degradation(factor=2, jpeg=100)


def test_lowres_input_is_resized_to_the_latent_size_in_the_pixel_range() -> None:
    low = _images(2, 8)
    pixels = lowres_pixels(low, 16)
    assert pixels.shape == (2, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    same = lowres_pixels(low, 8)
    torch.testing.assert_close(same, torch.from_numpy(low).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert bicubic_upsample(low, 16).shape == (2, 16, 16, 3)


def test_noise_level_zero_is_nearly_clean_and_max_is_the_documented_mix() -> None:
    """Documented in conditioning.py: x_l = sqrt(a_l) x + sqrt(1 - a_l) eps with SD x4's low-res schedule."""
    scheduler = conditioning.make_low_res_scheduler()
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    def mix(level: int) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(0)
        out = conditioning.augment(x, torch.full((64,), level), scheduler, gen)
        scale = float((out * x).sum() / (x * x).sum())  # least-squares signal scale (noise is independent of x)
        return scale, float((out - scale * x).std())
    scale0, noise0 = mix(0)
    assert scale0 == pytest.approx(0.99995, abs=2e-3) and noise0 == pytest.approx(0.0100, rel=0.05)
    scale350, noise350 = mix(350)
    assert scale350 == pytest.approx(0.800, abs=0.01) and noise350 == pytest.approx(0.600, rel=0.05)
    levels = conditioning.sample_levels(4000, 250, torch.Generator().manual_seed(0))
    assert int(levels.min()) == 0 and int(levels.max()) == 250  # both ends are trained
    conditioning.check_noise_level(250, 250)
    with pytest.raises(conditioning.NoiseLevelError, match=r"\[0, 250\]"):
        conditioning.check_noise_level(251, 250)
