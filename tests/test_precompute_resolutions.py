"""One precompute run writing several resolutions (`--resolutions 16,32`) on the real Ray head.

The one-pass run must equal two single-resolution runs over the same ingest shards (same keys,
latents within tolerance, same text embeddings and sample records), each resolution an ordinary
dataset in OUTPUT/<R>px/, and the parent manifest must say what each stage needs from each size.
Real parts: a tiny diffusers AutoencoderKL and open_clip checkpoint, webdataset ingest tars.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from latentforge import formats
from latentforge.manifest import manifest_digest, read_manifest
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from latentforge.precompute.config import PrecomputeConfig
from latentforge.precompute.preprocess import iter_ingest_shard, preprocess_resolutions, preprocess_sample
from latentforge.tar_samples import iter_shard
from tests.harness.ingest_shards import write_ingest_shards
from tests.harness.tiny_models import save_tiny_autoencoder_kl
from tests.test_precompute_pipeline import _args, _tar_hashes, _tracking  # noqa: F401  (_tracking: autouse)

SIZES = (16, 32)
FAST = ("--fidelity-samples", "2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resolutions")
    return {"root": root, "ingest": write_ingest_shards(root / "ingest", shard_sizes=(6, 6)),
            "kl": save_tiny_autoencoder_kl(root / "kl"), "clip": save_tiny_clip_checkpoint(root / "clip.safetensors")}


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    return {key: members for tar in sorted(out.glob("*.tar")) for key, members in iter_shard(str(tar))}


@pytest.fixture(scope="module")
def runs(data, ray_session):
    """One `--resolutions 16,32 --store-pixels` run and the two single-resolution runs it replaces."""
    from jobs.precompute_latents import main

    root = data["root"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        assert main(_args(data, root / "multi", *FAST, "--resolutions", "16,32", "--store-pixels")) == 0
        assert main(_args(data, root / "single16", *FAST, "--resolution", "16")) == 0
        assert main(_args(data, root / "single32", *FAST, "--resolution", "32", "--store-pixels")) == 0
    return {"multi": root / "multi", 16: root / "single16", 32: root / "single32"}


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_one_pass_equals_two_single_resolution_runs(data, runs, size: int) -> None:
    one_pass, single = _samples(runs["multi"] / f"{size}px"), _samples(runs[size])
    assert sorted(one_pass) == sorted(single) == sorted(data["ingest"].good)
    for key, members in one_pass.items():
        expected = single[key]
        assert sorted(members) == sorted(expected)
        assert ("pixels.npy" in members) == (size == 32)  # --store-pixels: every size above the lowest
        np.testing.assert_allclose(formats.decode_npy(members["latent.npy"]),
                                   formats.decode_npy(expected["latent.npy"]), rtol=1e-5, atol=1e-5)
        assert formats.decode_npy(members["latent.npy"]).shape == (2, 4, size // 2, size // 2)  # mean_std
        for name in ("text.npy", "pooled.npy"):
            np.testing.assert_allclose(formats.decode_npy(members[name]), formats.decode_npy(expected[name]),
                                       rtol=1e-6, atol=1e-6)
        for name in ("txt", "json") + (("pixels.npy",) if size == 32 else ()):
            assert members[name] == expected[name], (key, name)
    multi = read_manifest(str(runs["multi"] / f"{size}px"), stage="precompute")
    plain = read_manifest(str(runs[size]), stage="precompute")
    assert multi.counts == plain.counts and multi.counts["skipped"] == 4
    for field in ("latent_shape", "resolution", "pixels", "preprocessing", "empty_caption", "complete"):
        assert multi.extra[field] == plain.extra[field], field
    assert multi.extra["fidelity"]["passed"] and multi.extra["fidelity"]["samples"] == 2
    assert multi.config["resolutions"] == [] and multi.config["output"] == str(runs["multi"] / f"{size}px")


@pytest.mark.slow
def test_parent_manifest_records_each_resolution(runs) -> None:
    parent = read_manifest(str(runs["multi"]), stage="precompute")
    assert parent.shards == [] and parent.extra["complete"] is True
    assert parent.config["resolutions"] == [16, 32] and parent.models["vae"]["scaling_factor"] == 0.5
    low, high = parent.extra["resolutions"]
    assert (low["dir"], low["resolution"], low["latent_shape"], low["pixels"]) == ("16px", 16, [4, 8, 8], False)
    assert (high["dir"], high["resolution"], high["latent_shape"], high["pixels"]) == ("32px", 32, [4, 16, 16], True)
    for entry in (low, high):
        assert entry["scaling_factor"] == 0.5 and entry["shift_factor"] == 0.1 and entry["samples"] == 8
        assert entry["manifest_sha256"] == manifest_digest(str(runs["multi"] / entry["dir"]))
        assert entry["stages"]["base"] == {"in_channels": 4, "latent_channels": 4}
    assert "upscaler" not in low["stages"]
    assert high["stages"]["upscaler"] == {"in_channels": 7, "latent_channels": 4, "noise_level_range": [0, 350],
                                          "scaling_factor": 0.5,
                                          "lowres_from": [{"resolution": 16, "dir": "16px", "lowres_factor": 2}]}


@pytest.mark.slow
def test_the_upscaler_record_is_what_training_builds(runs) -> None:
    """The parent's upscaler in-channels are those of the UNet `jobs/train.py --stage upscaler` resolves."""
    from latentforge.training.config import TrainConfig
    from pipelines.train import check_data

    data = str(runs["multi"] / "32px")
    config = TrainConfig(data=data, stage="upscaler", lowres_factor=2, unet="tiny")
    unet = check_data(config, read_manifest(data, stage="precompute"))
    upscaler = read_manifest(str(runs["multi"]), stage="precompute").extra["resolutions"][1]["stages"]["upscaler"]
    assert unet["in_channels"] == upscaler["in_channels"] and unet["num_class_embeds"] == 351


@pytest.mark.slow
def test_rerun_keeps_everything_and_other_layouts_are_refused(data, runs, capsys) -> None:
    from jobs.precompute_latents import main

    out = runs["multi"]
    before = {size: _tar_hashes(out / f"{size}px") for size in SIZES}
    assert main(_args(data, out, *FAST, "--resolutions", "16,32", "--store-pixels")) == 0
    printed = capsys.readouterr().out
    assert "shards (16px)" in printed and printed.count("2 (2 kept from an earlier run)") == 2
    assert {size: _tar_hashes(out / f"{size}px") for size in SIZES} == before
    # a shard finished at one size only (a driver killed between the two publishes): only it is redone
    (out / "32px" / "00001.tar").unlink()
    untouched = {p.name: p.stat().st_mtime_ns for p in (out / "16px").glob("*.tar")}
    assert main(_args(data, out, *FAST, "--resolutions", "16,32", "--store-pixels")) == 0
    printed = capsys.readouterr().out
    assert re.search(r"shards \(16px\)\s+2 \(2 kept", printed) and re.search(r"shards \(32px\)\s+2 \(1 kept", printed)
    assert {size: _tar_hashes(out / f"{size}px") for size in SIZES} == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "16px").glob("*.tar")} == untouched
    refusals = [(_args(data, out, "--resolution", "16"), "16px, 32px"),  # a single run into the parent
                (_args(data, out, "--resolutions", "16,64", "--store-pixels"), "resolutions"),
                (_args(data, runs[16], "--resolutions", "16,32"), "single-resolution"),
                (_args(data, out, "--resolution", "16", "--resolutions", "16,32"), "exclude each other")]
    for argv, message in refusals:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert {size: _tar_hashes(out / f"{size}px") for size in SIZES} == before
    assert not (out / "64px").exists() and not list(out.glob("*.tar"))


@pytest.mark.slow
def test_train_refuses_the_parent_naming_its_datasets(runs, tmp_path, capsys) -> None:
    from jobs.train import main

    rc = main(["--preset", "tiny", "--data", str(runs["multi"]), "--steps", "1", "--storage-path", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(runs["multi"] / "16px") in err[0] and str(runs["multi"] / "32px") in err[0]
    assert not list(tmp_path.iterdir())  # refused before any run storage or worker


def test_resolutions_config() -> None:
    config = PrecomputeConfig(input="in", output="out", vae_type="patchify", resolutions=[32, 16], store_pixels=True)
    assert config.resolutions == [16, 32] and config.resolution == 16
    low, high = config.at_resolution(16), config.at_resolution(32)
    assert (low.output, low.store_pixels, low.resolutions) == ("out/16px", False, [])
    assert (high.output, high.store_pixels, high.resolution) == ("out/32px", True, 32)
    assert config.column("latent", 32) == "latent_32" and high.column("latent", 32) == "latent"
    for bad in ([16], [16, 16], [0, 16]):
        with pytest.raises(ValueError, match="resolutions"):
            PrecomputeConfig(input="in", output="out", vae_type="patchify", resolutions=bad)


def test_one_decode_gives_each_single_resolution_result(data) -> None:
    """Every size from one decode equals preprocessing at that size alone (image and json record)."""
    for sample in iter_ingest_shard(str(data["ingest"].dir / "00000.tar")):
        status, images, records = preprocess_resolutions(sample, SIZES, "bicubic", "center", 0, False)
        for size in SIZES:
            alone = preprocess_sample(sample, size, "bicubic", "center", 0, False)
            assert status == alone[0] and json.dumps(records[size]) == json.dumps(alone[2])
            if status == "ok":
                np.testing.assert_array_equal(images[size], alone[1])
            else:
                assert images == {}
