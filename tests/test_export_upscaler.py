"""jobs/export_model.py on an upscaler export: a StableDiffusionUpscalePipeline folder that loads offline and
upsamples like our `Upscaler`, and one-line refusals (exit 2) for an upscaler the pipeline cannot run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.harness.job_process import run_job
from tests.harness.tiny_export import build_tiny_export

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RESOLUTION = 32
MAX_NOISE_LEVEL = 30
PROMPTS = ["a red circle at the top", "two blue squares!"]
SEEDS = [3, 11]


def build_upscaler_export(root: Path, vae: str = "autoencoder_kl", lowres_factor: int = 2,
                          residual_scale: float | None = None) -> Path:
    """A tiny random upscaler written by the train stage's `write_export` with the `extra.upscaler` its
    setup records; it samples the latents themselves unless `residual_scale` is given."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from latentforge import storage
    from latentforge.trained_model import read_data_manifest
    from latentforge.training.config import TrainConfig
    from latentforge.training.export_writer import write_export
    from latentforge.upscaler.conditioning import resolve_upscaler_unet
    from latentforge.upscaler.training import upscaler_setup

    base = build_tiny_export(root, vae=vae, resolution=RESOLUTION, text_states="full")
    data = read_data_manifest(str(base.dir))
    data.extra["pixels"] = {"member": "pixels.npy", "size": [RESOLUTION, RESOLUTION]}  # as --store-pixels records
    channels, latent_size = data.extra["latent_shape"][0], data.extra["latent_shape"][1]
    storage.atomic_write_json(str(root / "latents" / "manifest.json"), data.to_dict())
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**resolve_upscaler_unet("tiny", channels, 32, latent_size, MAX_NOISE_LEVEL))
    with torch.no_grad():  # random init leaves the output conv near zero: make every weight matter
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = TrainConfig(data=str(root / "latents"), stage="upscaler", lowres_factor=lowres_factor,
                         max_noise_level=MAX_NOISE_LEVEL)
    record = upscaler_setup(config, data).record(data)
    record.pop("residual_scale", None)
    record.update({"residual_scale": residual_scale} if residual_scale else {})
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    export = root / "sr" / "export"
    write_export(str(export), unet.eval(), scheduler, str(root / "latents"),
                 storage.sha256_file(str(root / "latents" / "manifest.json")), data, {"stage": "upscaler"}, 5, None,
                 extra={"upscaler": record})
    return export


@pytest.fixture(scope="module")
def sr_export(tmp_path_factory) -> Path:
    return build_upscaler_export(tmp_path_factory.mktemp("sr"))


@pytest.fixture(scope="module")
def sr_folder(sr_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sr_out") / "upscale"
    proc = run_job("export_model", ["--model", str(sr_export), "--format", "diffusers", "--out", str(out)],
                   out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def lowres_images() -> np.ndarray:
    """uint8 (2, 16, 16, 3): random 4x4 colours upsampled, smooth like an image rather than noise."""
    from PIL import Image

    coarse = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(a).resize((16, 16), Image.Resampling.BICUBIC)) for a in coarse])


def ours(export: Path, images: np.ndarray, levels: tuple[int, ...]) -> list[np.ndarray]:
    """Our `Upscaler` (what jobs/generate.py --upscaler runs), DDIM, at each noise level."""
    from latentforge.trained_model import load_export
    from latentforge.generation.sampler import SampleParams
    from latentforge.upscaler.sampling import Upscaler

    upscaler, params = Upscaler(load_export(str(export))), SampleParams(sampler="ddim", steps=6, guidance=3.0)
    return [np.stack([item.to_uint8() for item in upscaler.upscale(images, PROMPTS, SEEDS, params, level)]
                     ).astype(np.int16) for level in levels]


def theirs(folder: Path, images: np.ndarray, levels: tuple[int, ...]) -> list[np.ndarray]:
    """The pipeline with our seeds' initial latents and augmentation-noise generators (sampling.Upscaler's)."""
    from diffusers import StableDiffusionUpscalePipeline
    from diffusers.utils.torch_utils import randn_tensor
    from PIL import Image

    from latentforge.upscaler.sampling import AUGMENT_SEED_SALT

    pipe = StableDiffusionUpscalePipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for level in levels:
        latents = randn_tensor((2, 4, 16, 16), generator=[torch.Generator().manual_seed(s) for s in SEEDS])
        augment = [torch.Generator().manual_seed(s ^ AUGMENT_SEED_SALT) for s in SEEDS]
        result = pipe(PROMPTS, image=[Image.fromarray(a) for a in images], num_inference_steps=6, guidance_scale=3.0,
                      noise_level=level, generator=augment, latents=latents, output_type="np").images
        out.append((result * 255).round().astype(np.int16))
    return out


def test_folder_loads_offline_with_the_upscale_layout(sr_export, sr_folder) -> None:
    from latentforge.manifest import read_manifest

    index = json.loads((sr_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == MAX_NOISE_LEVEL
    assert index["low_res_scheduler"][1] == "DDPMScheduler" and index["scheduler"][1] == "DDIMScheduler"
    low_res = json.loads((sr_folder / "low_res_scheduler" / "scheduler_config.json").read_text())
    assert (low_res["beta_start"], low_res["beta_end"]) == (0.0001, 0.02)
    vae = json.loads((sr_folder / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.08333  # the one the pipeline keeps; ours (0.5) is folded into the weights
    extra = read_manifest(str(sr_folder), stage="export").extra
    assert extra["vae_scaling_factor"] == 0.5 and extra["upscaler"]["lowres_size"] == 16


def test_pipeline_upsamples_like_our_upscaler(sr_export, sr_folder) -> None:
    images, levels = lowres_images(), (0, 25)
    for level, mine, pipeline in zip(levels, ours(sr_export, images, levels), theirs(sr_folder, images, levels)):
        assert mine.shape == pipeline.shape == (2, RESOLUTION, RESOLUTION, 3)
        assert np.abs(mine - pipeline).max() <= 1, level  # within 1/255 per pixel
    assert np.abs(mine[0] - mine[1]).max() > 3  # inputs, prompts and seeds really differ


def test_folded_vae_decodes_and_round_trips_like_the_original(sr_export, sr_folder) -> None:
    from diffusers import AutoencoderKL

    from latentforge.trained_model import read_data_manifest
    from latentforge.models.vae import load_vae_from_manifest

    original = load_vae_from_manifest(read_data_manifest(str(sr_export))).model
    folded = AutoencoderKL.from_pretrained(str(sr_folder / "vae"))
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(folded.decode(latents / 0.08333).sample, original.decode(latents / 0.5).sample,
                              atol=1e-5)
        posterior, folded_posterior = original.encode(pixels).latent_dist, folded.encode(pixels).latent_dist
        assert torch.allclose(folded_posterior.mean * 0.08333, posterior.mean * 0.5, atol=1e-5)
        assert torch.allclose(folded_posterior.std * 0.08333, posterior.std * 0.5, atol=1e-5)
        assert torch.allclose(folded.decode(folded_posterior.mean).sample, original.decode(posterior.mean).sample,
                              atol=1e-5)


def refused(export: Path, out: Path, match: str) -> None:
    from latentforge.conversion.config import ExportConfig
    from latentforge.conversion.target import ExportRefused
    from pipelines.export import run

    with pytest.raises(ExportRefused, match=match):
        run(ExportConfig(model=str(export), out=str(out)))
    assert not out.exists() and not [p for p in os.listdir(out.parent) if ".tmp-" in p]


def test_shapes_the_pipeline_cannot_run_are_refused(sr_export, tmp_path) -> None:
    """In process: the job maps ExportRefused to one line and exit 2 (tests/test_export_diffusers.py runs it)."""
    from latentforge.conversion.config import ExportConfig
    from latentforge.conversion.target import ExportRefused
    from pipelines.export import run

    patchify = build_upscaler_export(tmp_path / "patchify", vae="patchify")
    refused(patchify, tmp_path / "a", "decodes with an AutoencoderKL but this upscaler's VAE type is 'patchify'")
    factor4 = build_upscaler_export(tmp_path / "factor4", lowres_factor=4)
    refused(factor4, tmp_path / "b", r"takes 8x8 px low-res images beside 16x16 latents \(lowres factor 4 != the "
                                     r"VAE's downsample 2\); fix: train with --lowres-factor 2")
    residual = build_upscaler_export(tmp_path / "residual", residual_scale=10.0)
    refused(residual, tmp_path / "c", r"samples the residual over the latent of the bicubic upsample")
    with pytest.raises(ExportRefused, match="single-file export refused: the model is an upscaler"):
        run(ExportConfig(model=str(sr_export), format="single-file", out=str(tmp_path / "m.safetensors")))


def test_training_exports_an_upscaler_as_its_diffusers_folder(sr_export) -> None:
    from latentforge.config import ConfigError
    from latentforge.conversion.target import ExportRefused
    from latentforge.trained_model import read_data_manifest
    from latentforge.manifest import read_manifest
    from latentforge.training.config import TrainConfig
    from pipelines.export import export_formats, preflight

    TrainConfig(data="d", stage="upscaler", export_formats=["diffusers"])
    with pytest.raises(ConfigError, match="StableDiffusionUpscalePipeline folder only"):
        TrainConfig(data="d", stage="upscaler", export_formats=["single-file"])
    data, record = read_data_manifest(str(sr_export)), read_manifest(str(sr_export), stage="train").extra["upscaler"]
    preflight(data, ["diffusers"], tracked=False, upscaler=record)
    with pytest.raises(ExportRefused, match="lowres factor 4 != the VAE's downsample 2"):
        preflight(data, ["diffusers"], tracked=False, upscaler={**record, "lowres_factor": 4, "lowres_size": 8})
    assert export_formats(str(sr_export), ["diffusers"]) == [str(sr_export.parent / "diffusers")]
    index = json.loads((sr_export.parent / "diffusers" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline"


def test_train_refuses_an_upscaler_it_could_not_export_before_any_worker_starts(tmp_path) -> None:
    from latentforge.conversion.target import ExportRefused
    from latentforge.models.text_encoder import save_tiny_clip_checkpoint
    from latentforge.training.config import TrainConfig
    from pipelines.train import run
    from tests.harness.sr_scenes import write_scene_latents

    clip = str(save_tiny_clip_checkpoint(tmp_path / "clip.safetensors"))
    data = write_scene_latents(tmp_path / "lat32", clip, count=4, resolution=RESOLUTION, shard_size=4)  # patchify
    config = TrainConfig(data=str(data.dir), stage="upscaler", lowres_factor=2, export_formats=["diffusers"],
                         batch_size=2, storage_path=str(tmp_path / "runs"), mlflow=False)
    with pytest.raises(ExportRefused, match="VAE type is 'patchify'"):
        run(config)
    assert not (tmp_path / "runs").exists()
