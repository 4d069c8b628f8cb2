"""jobs/export_model.py --format diffusers: a folder StableDiffusionPipeline loads offline, equal to the
export, the same images as jobs/generate.py, and refusals that leave nothing behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.harness.diffusers_parity import generate_job_images, load_pipeline, pipeline_images
from tests.harness.job_process import run_job
from tests.harness.tiny_export import build_tiny_export


@pytest.fixture(scope="module")
def kl_source(tmp_path_factory):
    return build_tiny_export(tmp_path_factory.mktemp("kl"), vae="autoencoder_kl", resolution=32, text_states="full")


@pytest.fixture(scope="module")
def kl_folder(kl_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("kl_out") / "sd"
    proc = run_job("export_model", ["--model", str(kl_source.dir), "--format", "diffusers", "--out", str(out)],
                   out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_folder_loads_offline_and_holds_the_export(kl_source, kl_folder) -> None:
    from diffusers import UNet2DConditionModel

    from latentforge.conversion.target import load_source
    from latentforge.manifest import read_manifest

    pipe = load_pipeline(kl_folder)
    index = json.loads((kl_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][1] == "DDIMScheduler"
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(os.listdir(kl_folder))
    source = UNet2DConditionModel.from_pretrained(str(kl_source.dir / "unet"))
    for (name, theirs), ours in zip(pipe.unet.state_dict().items(), source.state_dict().values()):
        assert torch.equal(theirs, ours), name
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    assert pipe.vae.config.scaling_factor == 0.5
    manifest = read_manifest(str(kl_folder), stage="export")
    assert manifest.inputs[0]["sha256"] == load_source(str(kl_source.dir)).digest


def test_pipeline_images_equal_generate_job(kl_source, kl_folder, tmp_path) -> None:
    theirs = pipeline_images(load_pipeline(kl_folder))
    ours = generate_job_images(kl_source.dir, tmp_path)  # text states: the manifest's (full)
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= 1  # within 1/255 per pixel
    assert np.abs(ours[0] - ours[1]).max() > 3  # prompts/seeds really differ


def test_img2img_pipeline_equals_generate_job(tmp_path) -> None:
    """AutoencoderTiny: the img2img pipeline encodes deterministically, as --init-image does."""
    from PIL import Image

    source = build_tiny_export(tmp_path / "src", vae="autoencoder_tiny", resolution=32, text_states="full")
    folder = tmp_path / "sd"
    proc = run_job("export_model", ["--model", str(source.dir), "--out", str(folder)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    theirs = pipeline_images(load_pipeline(folder, "StableDiffusionImg2ImgPipeline"), image=[init] * 2, strength=0.6)
    ours = generate_job_images(source.dir, tmp_path, "--init-image", str(tmp_path / "init.png"), "--strength", "0.6")
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours[0] - np.asarray(init, np.int16)).max() > 3  # the image was really denoised


def _refused(model_dir, out, tmp_path, match: str) -> None:
    proc = run_job("export_model", ["--model", str(model_dir), "--format", "diffusers", "--out", str(out)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert match in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not [p for p in os.listdir(out.parent) if ".tmp-" in p]


def test_refusals_exit_2_and_write_nothing(kl_source, kl_folder, tmp_path) -> None:
    patchify = build_tiny_export(tmp_path / "patchify", vae="patchify", text_states="full")
    _refused(patchify.dir, tmp_path / "a", tmp_path, "VAE type 'patchify'")
    masked = build_tiny_export(tmp_path / "masked", vae="autoencoder_kl")  # no convention recorded: masked
    _refused(masked.dir, tmp_path / "b", tmp_path, "text_states='real_tokens'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # --out made from another export: refused, left as it was
    before = (kl_folder / "manifest.json").read_bytes()
    other = build_tiny_export(tmp_path / "other", vae="autoencoder_kl", text_states="full", seed=1)
    _refused(other.dir, kl_folder, tmp_path, "not made from this export")
    assert (kl_folder / "manifest.json").read_bytes() == before
    # a missing component
    import shutil

    shutil.rmtree(other.dir.parent / "vae")
    _refused(other.dir, tmp_path / "c", tmp_path, "weights")


def test_rerun_into_the_same_out_replaces_it(kl_source, kl_folder, tmp_path) -> None:
    from latentforge.conversion.config import ExportConfig
    from pipelines.export import run

    result = run(ExportConfig(model=str(kl_source.dir), out=str(kl_folder)))
    assert result.out == str(kl_folder) and (kl_folder / "model_index.json").exists()
    assert not [p for p in os.listdir(kl_folder.parent) if p.startswith(".")]
