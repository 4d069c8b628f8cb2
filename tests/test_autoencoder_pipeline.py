"""The autoencoder job end to end on the real Ray head (`ray_session`): train, resume, MLflow, precompute.

Real parts: ingest-format shards written with webdataset, the job's own `main(argv)`, Ray Train
workers on the session cluster, a sqlite MLflow store, and the precompute job reading the export
as an ordinary `--vae`. Expected latents come from a direct diffusers encode.
"""

from __future__ import annotations

import json

import pytest
import torch

from latentforge import formats
from latentforge.manifest import read_manifest
from latentforge.precompute.preprocess import iter_ingest_shard, preprocess_sample
from latentforge.pixels import to_pixels
from latentforge.tar_samples import iter_shard
from tests.harness.ingest_shards import write_ingest_shards

pytestmark = pytest.mark.slow
RES = 16


def _args(root, run_name: str, steps: int) -> list[str]:
    return ["--preset", "tiny", "--data", str(root / "shards"), "--resolution", str(RES), "--steps", str(steps),
            "--batch-size", "4", "--checkpoint-every", "3", "--eval-every", "3", "--val-samples", "4",
            "--scale-samples", "8", "--log-every", "1", "--storage-path", str(root / "runs"), "--run-name", run_name]


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """A 6-step run, then the same run name rerun with --steps 8 (a resume)."""
    from jobs.train_autoencoder import main

    root = tmp_path_factory.mktemp("ae_pipeline")
    write_ingest_shards(root / "shards", shard_sizes=(12, 12))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        first = main(_args(root, "ae", 6))
        first_manifest = read_manifest(str(root / "runs" / "ae" / "export"), stage="autoencoder")
        second = main(_args(root, "ae", 8))
    return {"root": root, "codes": (first, second), "first": first_manifest,
            "export": root / "runs" / "ae" / "export"}


def test_trains_exports_and_resumes_in_one_mlflow_run(trained) -> None:
    from mlflow.tracking import MlflowClient

    assert trained["codes"] == (0, 0)
    manifest = read_manifest(str(trained["export"]), stage="autoencoder")
    assert (trained["first"].extra["step"], manifest.extra["step"]) == (6, 8)
    assert manifest.extra["resumes"] == 1 and manifest.counts["samples_seen"] == 8 * 4
    assert manifest.counts["skipped_undecodable_image"] >= 1  # counted, not silently dropped
    run_id = manifest.extra["mlflow_run_id"]
    assert run_id == trained["first"].extra["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{trained['root']}/mlflow.db")
    assert [s.step for s in client.get_metric_history(run_id, "val/psnr")] == [3, 6, 8]
    assert len(client.get_metric_history(run_id, "val/ssim")) == 3
    assert len(client.get_metric_history(run_id, "loss")) == 8
    grids = [a.path for a in client.list_artifacts(run_id, "reconstructions")]
    assert "reconstructions/reconstructions_step000008.png" in grids
    assert manifest.extra["metrics"]["psnr"] == pytest.approx(client.get_metric_history(run_id, "val/psnr")[-1].value)


def test_precompute_with_the_export_equals_a_direct_diffusers_encode(trained, tmp_path, monkeypatch) -> None:
    from diffusers import AutoencoderKL

    from jobs.precompute_latents import main
    from latentforge.models.text_encoder import save_tiny_clip_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    export, out = str(trained["export"]), tmp_path / "latents"
    clip = save_tiny_clip_checkpoint(tmp_path / "clip.safetensors")
    assert main(["--preset", "tiny", "--input", str(trained["root"] / "shards"), "--output", str(out),
                 "--vae", export, "--vae-type", "autoencoder_kl", "--text-encoder-weights", clip,
                 "--resolution", str(RES), "--latent", "mean", "--dtype", "fp32", "--batch-size", "4",
                 "--no-progress"]) == 0
    vae = AutoencoderKL.from_pretrained(export, use_safetensors=True).eval()
    scale = vae.config.scaling_factor
    assert read_manifest(str(out), stage="precompute").models["vae"]["scaling_factor"] == scale
    compared = 0
    for shard in ("00000", "00001"):
        inputs = {s.key: s for s in iter_ingest_shard(str(trained["root"] / "shards" / f"{shard}.tar"))}
        for key, members in iter_shard(str(out / f"{shard}.tar")):
            image = preprocess_sample(inputs[key], RES, "bicubic", "center", 0, False)[1]
            with torch.no_grad():
                expected = vae.encode(to_pixels(image[None])).latent_dist.mean * scale
            stored = torch.from_numpy(formats.decode_npy(members["latent.npy"]))
            torch.testing.assert_close(stored, expected[0], rtol=1e-5, atol=1e-5)
            compared += 1
    assert compared == 20


def test_train_refuses_a_unet_whose_channels_differ_from_the_autoencoder(trained, tmp_path, capsys) -> None:
    """The latent channels the autoencoder recorded reach train's check: exit 2, one line, no worker."""
    from jobs.precompute_latents import main as precompute
    from jobs.train import main as train
    from latentforge.models.text_encoder import save_tiny_clip_checkpoint
    from latentforge.models.unet import PRESETS

    clip = save_tiny_clip_checkpoint(tmp_path / "clip.safetensors")
    out = tmp_path / "latents"
    assert precompute(["--preset", "tiny", "--input", str(trained["root"] / "shards"), "--output", str(out),
                       "--vae", str(trained["export"]), "--vae-type", "autoencoder_kl", "--text-encoder-weights",
                       clip, "--resolution", str(RES), "--max-shards", "1", "--fidelity-samples", "0",
                       "--no-progress"]) == 0
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps({**PRESETS["tiny"], "in_channels": 8, "out_channels": 8, "cross_attention_dim": 32}))
    capsys.readouterr()
    assert train(["--preset", "tiny", "--data", str(out), "--unet", str(unet), "--storage-path",
                  str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in_channels 8 but the latents have 4 channels" in err[0]
    assert not (tmp_path / "runs").exists()


def test_two_workers_with_the_discriminator_checkpoint_each_rank_and_export(trained, monkeypatch) -> None:
    """DDP over two Ray Train workers, one shard each; every rank's stream position is checkpointed."""
    from jobs.train_autoencoder import main

    root = trained["root"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    assert main([*_args(root, "ae2", 3), "--num-workers", "2", "--discriminator", "--disc-layers", "2",
                 "--disc-channels", "8"]) == 0
    manifest = read_manifest(str(root / "runs" / "ae2" / "export"), stage="autoencoder")
    assert manifest.extra["step"] == 3 and manifest.counts["samples_seen"] == 3 * 4 * 2
    checkpoints = sorted(p for p in (root / "runs" / "ae2").glob("checkpoint_*") if p.is_dir())
    assert checkpoints, "no checkpoint written"
    names = {p.name for p in checkpoints[-1].iterdir()}
    assert {"rank0.json", "rank1.json", "model.safetensors", "discriminator.safetensors"} <= names
