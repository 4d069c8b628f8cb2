"""Precompute library parts without Ray: preprocessing, encoding, writer, plan, fidelity."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge import formats, storage
from latentforge.config import ConfigError, parse_config
from latentforge.manifest import ManifestError
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from tests.harness.tiny_models import save_tiny_autoencoder_kl
from latentforge.precompute.config import PrecomputeConfig
from latentforge.precompute.encode import PrecomputeEncoder, key_noise
from latentforge.precompute.fidelity import relative_error
from latentforge.pixels import to_pixels
from latentforge.precompute.preprocess import crop_offset, iter_ingest_shard, preprocess_image, preprocess_sample
from latentforge.precompute.stage import plan_run
from latentforge.precompute.writer import ShardWriter
from latentforge.tar_samples import iter_shard
from tests.harness.ingest_shards import write_ingest_shards


def _png(w: int, h: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_preprocess_resizes_shorter_side_and_records_the_crop() -> None:
    image, geometry = preprocess_image(_png(64, 32), 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert geometry == {"decoded_size": [32, 64], "crop_top_left": [0, 8], "target_size": [16, 16]}
    _, tall = preprocess_image(_png(20, 50), 10)
    assert tall["crop_top_left"] == [7, 0]  # 50 -> 25 rows, centre crop of 10
    # random crops are seeded by key: reproducible, and different keys differ somewhere
    offsets = {crop_offset((100, 100), 10, "random", 0, f"{k:09d}") for k in range(20)}
    assert len(offsets) > 1 and crop_offset((100, 100), 10, "random", 0, "k") == crop_offset((100, 100), 10, "random", 0, "k")
    pixels = to_pixels(np.array([[[[0, 255, 127]]]], dtype=np.uint8))
    assert pixels.shape == (1, 3, 1, 1) and pixels.flatten().tolist() == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1])


def test_ingest_shard_reading_and_bad_samples(tmp_path) -> None:
    info = write_ingest_shards(tmp_path / "in", shard_sizes=(7,))
    samples = list(iter_ingest_shard(str(tmp_path / "in" / "00000.tar")))
    assert [s.key for s in samples] == info.keys
    statuses = {s.key: preprocess_sample(s, 16, "bicubic", "center", 0, False)[0] for s in samples}
    assert {k for k, v in statuses.items() if v == "ok"} == set(info.good)
    assert {statuses[k] for k in info.undecodable} == {"undecodable_image"}
    assert {statuses[k] for k in info.empty_caption} == {"empty_caption"}
    kept = preprocess_sample(samples[5], 16, "bicubic", "center", 0, True)
    assert kept[0] == "ok" and kept[2]["original_size"] == [96, 80]  # ingest's original size, [h, w]


def test_config_validation_and_presets(tmp_path) -> None:
    from jobs import _bootstrap

    presets = _bootstrap.PRESETS / "precompute"
    for name in ("tiny", "sd15", "sd2"):
        config = parse_config(PrecomputeConfig, ["--preset", name, "--input", "a", "--output", "b"], preset_dir=presets)
        assert config.resolution >= 32
    assert parse_config(PrecomputeConfig, ["--preset", "sd2"], preset_dir=presets).text_layer == "penultimate"
    with pytest.raises(ConfigError):
        PrecomputeConfig(vae_type="vqgan")
    with pytest.raises(ConfigError):
        PrecomputeConfig(vae_type="autoencoder_kl", vae="")
    with pytest.raises(ConfigError):
        PrecomputeConfig(input="", output="x").check_required()
    assert PrecomputeConfig(dtype="bf16").tolerance == 5e-2


def test_job_exit_codes_for_bad_usage(tmp_path) -> None:
    from jobs.precompute_latents import main

    assert main(["--preset", "tiny"]) == 2  # no --input/--output
    assert main(["--preset", "tiny", "--latent", "posterior", "--input", "a", "--output", "b"]) == 2
    assert main(["--preset", "tiny", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return {"kl": save_tiny_autoencoder_kl(root / "kl"), "clip": save_tiny_clip_checkpoint(root / "clip.safetensors")}


def _config(tiny, **kw) -> PrecomputeConfig:
    base = dict(vae_type="autoencoder_kl", vae=tiny["kl"], text_encoder="lf-tiny-clip",
                text_encoder_weights=tiny["clip"], text_layer="last", resolution=16, dtype="fp32")
    base.update(kw)
    return PrecomputeConfig(**base)


def test_encode_batch_modes_and_nonfinite_rows(tiny) -> None:
    images = np.random.default_rng(1).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    batch = {"key": np.array(["a", "b", "c"]), "caption": np.array(["x", "y", "z"], dtype=object),
             "status": np.array(["ok", "empty_caption", "ok"]), "image": images}
    enc = PrecomputeEncoder(_config(tiny, latent="mean_std"))
    out = enc.encode_batch(dict(batch))
    assert out["latent"].shape == (3, 2, 4, 8, 8) and "image" not in out
    assert not out["latent"][1].any() and out["status"].tolist() == ["ok", "empty_caption", "ok"]
    mean, std = enc.vae.encode_posterior(to_pixels(images[[0, 2]]))
    torch.testing.assert_close(torch.from_numpy(out["latent"][[0, 2], 0]), (mean - 0.1) * 0.5)
    torch.testing.assert_close(torch.from_numpy(out["latent"][[0, 2], 1]), std * 0.5)
    # sample: mean + std * eps(seed, key), identical whatever the batch composition
    sample = PrecomputeEncoder(_config(tiny, latent="sample"))
    one = sample.encode_batch({k: v[[2]] for k, v in batch.items()})["latent"][0]
    all3 = sample.encode_batch(dict(batch))["latent"][2]
    eps = key_noise(["c"], (4, 8, 8), 0)[0]
    torch.testing.assert_close(torch.from_numpy(one), (mean[1] + std[1] * eps - 0.1) * 0.5)
    torch.testing.assert_close(torch.from_numpy(all3), torch.from_numpy(one), rtol=1e-5, atol=1e-5)
    assert not torch.equal(key_noise(["a"], (4,), 0), key_noise(["a"], (4,), 1))
    # a latent that overflows the fp16 storage dtype is marked and left out, never stored as inf
    big = PrecomputeEncoder(_config(tiny, dtype="fp16"))
    big.vae.scaling_factor = 1e6
    out = big.encode_batch(dict(batch))
    assert out["status"].tolist() == ["nonfinite_latent", "empty_caption", "nonfinite_latent"]
    assert np.isfinite(out["latent"].astype(np.float32)).all()


def test_writer_is_atomic_and_reproducible(tmp_path) -> None:
    def write(out) -> str:
        writer = ShardWriter(str(out), "00007", "bf16", input_sha256="x")
        for i in range(3):
            latent = formats.tensor_to_storage(torch.full((4, 2, 2), float(i)), "bf16")
            text = formats.tensor_to_storage(torch.ones(77, 8), "bf16")
            writer.add({"key": f"00007000{i}", "status": "ok", "text_length": 5, "meta": '{"key": "k"}',
                        "caption": "c", "latent": latent, "text": text,
                        "pooled": formats.tensor_to_storage(torch.ones(8), "bf16")})
            assert not (out / "00007.tar").exists()  # nothing published before finish
        writer.add({"key": "000070009", "status": "undecodable_image"})
        writer.expected = 4
        assert writer.complete
        return writer.finish()

    a, b = write(tmp_path / "a"), write(tmp_path / "b")
    assert a.sha256 == b.sha256 and a.samples == 3 and a.stats["skipped"] == {"undecodable_image": 1}
    assert a.stats["latent_mean"] == pytest.approx(1.0) and a.stats["latent_std"] == pytest.approx((2 / 3) ** 0.5)
    members = dict(iter_shard(str(tmp_path / "a" / "00007.tar")))
    assert sorted(members["000070001"]) == ["json", "latent.npy", "pooled.npy", "text.npy", "txt"]
    text = formats.storage_to_tensor(formats.decode_npy(members["000070001"]["text.npy"]), "bf16")
    assert text.shape == (5, 8) and text.dtype == torch.bfloat16
    assert formats.decode_json(members["000070001"]["json"])["text_length"] == 5
    with tarfile.open(tmp_path / "a" / "00007.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}
    assert storage.remove_stale_temps(str(tmp_path / "a")) == 0


def test_plan_refuses_other_settings_and_other_stage(tmp_path, tiny) -> None:
    from latentforge.manifest import Manifest, write_manifest
    from latentforge.config import config_to_dict

    write_ingest_shards(tmp_path / "in", shard_sizes=(3, 3))
    config = _config(tiny, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    plan = plan_run(config)
    assert [s.name for s in plan.pending] == ["00000", "00001"] and not plan.done
    (tmp_path / "out").mkdir()
    write_manifest(str(tmp_path / "out"), Manifest(stage="precompute", config=config_to_dict(config)))
    assert len(plan_run(config).pending) == 2
    with pytest.raises(ManifestError, match="text_layer"):
        plan_run(_config(tiny, input=str(tmp_path / "in"), output=str(tmp_path / "out"), text_layer="penultimate"))
    with pytest.raises(ManifestError, match="ingest"):
        plan_run(_config(tiny, input=str(tmp_path / "out"), output=str(tmp_path / "o2")))


def test_relative_error() -> None:
    ref = torch.tensor([1.0, -2.0, 4.0])
    assert relative_error(ref, ref) == 0.0
    assert relative_error(ref + torch.tensor([0.0, 0.4, 0.0]), ref) == pytest.approx(0.1)
