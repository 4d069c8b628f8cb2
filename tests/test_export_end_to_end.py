"""A model that went through the real stages exports to diffusers and gives the same images there.

ingest-format shards (webdataset's TarWriter) -> jobs/precompute_latents.py with a diffusers
AutoencoderKL (tiny, random, ``save_pretrained``) and the tiny open_clip checkpoint -> jobs/train.py
(tiny preset, a few steps on the session's Ray head) -> jobs/export_model.py --format diffusers.
``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` from the folder and jobs/generate.py
on the same export must agree within 1/255 per pixel, and the text-state convention must travel
the whole chain: latents manifest -> training's export -> diffusers folder.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from latentforge import storage
from latentforge.manifest import read_manifest
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from tests.harness.ingest_shards import write_ingest_shards
from tests.harness.job_process import run_job
from tests.harness.tiny_models import save_tiny_autoencoder_kl

pytestmark = pytest.mark.slow


def _through_the_stages(root: Path, text_states: str) -> Path:
    """Precompute and train in this process on the session's Ray head; returns the train export dir."""
    from jobs.precompute_latents import main as precompute
    from jobs.train import main as train

    shards = write_ingest_shards(root / "ingest", shard_sizes=(16, 16), bad=False)  # 32 samples
    vae = save_tiny_autoencoder_kl(root / "vae", shift_factor=None)  # StableDiffusionPipeline has no shift
    clip = save_tiny_clip_checkpoint(root / "clip.safetensors")
    latents = root / "latents"
    assert precompute(["--preset", "tiny", "--input", str(shards.dir), "--output", str(latents),
                       "--vae-type", "autoencoder_kl", "--vae", vae, "--text-encoder-weights", clip,
                       "--text-layer", "penultimate", "--text-states", text_states, "--resolution", "32",
                       "--dtype", "fp32", "--fidelity-samples", "0", "--no-progress", "--no-mlflow"]) == 0
    assert train(["--preset", "tiny", "--data", str(latents), "--steps", "20", "--batch-size", "8",
                  "--warmup-steps", "2", "--ema-decay", "0.5", "--storage-path", str(root / "runs"),
                  "--run-name", "e2e", "--no-mlflow"]) == 0
    return root / "runs" / "e2e" / "export"


def _export(model: Path, out: Path) -> subprocess.CompletedProcess:
    return run_job("export_model", ["--model", str(model), "--format", "diffusers", "--out", str(out)], out.parent)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e_full")
    export = _through_the_stages(root, "full")
    folder = root / "sd"
    proc = _export(export, folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"latents": root / "latents", "export": export, "folder": folder}


def test_text_states_travel_from_the_latents_to_the_diffusers_folder(trained) -> None:
    latents_manifest = read_manifest(str(trained["latents"]), stage="precompute")
    assert latents_manifest.extra["text_states"] == "full"
    latents_digest = storage.sha256_file(str(trained["latents"] / "manifest.json"))
    train_manifest = read_manifest(str(trained["export"]), stage="train")
    assert train_manifest.extra["step"] == 20
    assert [i["sha256"] for i in train_manifest.inputs if i["kind"] == "manifest"] == [latents_digest]
    # training keeps the latents manifest it trained on, byte for byte: the convention sampling reads
    assert storage.sha256_file(str(trained["export"] / "data_manifest.json")) == latents_digest
    folder_manifest = read_manifest(str(trained["folder"]), stage="export")
    assert folder_manifest.extra["text_states"] == "full"
    assert folder_manifest.extra["data_sha256"] == latents_digest


def test_pipeline_and_generate_job_give_the_same_images(trained, tmp_path) -> None:
    from tests.harness.diffusers_parity import generate_job_images, load_pipeline, pipeline_images

    theirs = pipeline_images(load_pipeline(trained["folder"]))
    ours = generate_job_images(trained["export"], tmp_path)
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= 1  # within 1/255 per pixel
    assert np.abs(ours[0] - ours[1]).max() > 3  # prompts/seeds really differ


def test_img2img_pipeline_and_generate_job_give_the_same_images(trained, tmp_path) -> None:
    """AutoencoderKL: the pipeline samples the encoder's distribution, seeded by the same generators."""
    from PIL import Image

    from tests.harness.diffusers_parity import generate_job_images, load_pipeline, pipeline_images

    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    pipe = load_pipeline(trained["folder"], "StableDiffusionImg2ImgPipeline")
    theirs = pipeline_images(pipe, image=[init] * 2, strength=0.6)
    ours = generate_job_images(trained["folder"], tmp_path, "--init-image", str(tmp_path / "init.png"),
                               "--strength", "0.6")  # --model: the diffusers folder resolves to its export
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours[0] - np.asarray(init, np.int16)).max() > 3  # the image was really denoised


def test_real_tokens_model_is_refused_with_the_fix_and_nothing_written(ray_session, tmp_path) -> None:
    export = _through_the_stages(tmp_path, "real_tokens")
    out = tmp_path / "sd"
    proc = _export(export, out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "text_states='real_tokens'" in lines[0] and "--text-states full" in lines[0], lines
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".sd.")]
