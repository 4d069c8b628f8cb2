"""Sampler correctness on tiny real models: parity with diffusers' StableDiffusionPipeline,
img2img endpoints, determinism, and the PNG/grid/jsonl outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latentforge.diffusion.schedulers import make_scheduler
from latentforge.generation import SampleParams, load_export
from latentforge.generation.outputs import (GRID_NAME, INDEX_NAME, contact_sheet, load_prompts, read_png_meta,
                                            save_grid, write_index)
from latentforge.generation.batch_generation import generate_to_dir
from tests.harness.tiny_export import build_tiny_export


@pytest.fixture(scope="module")
def kl_export(tmp_path_factory):
    return build_tiny_export(tmp_path_factory.mktemp("kl_export"), vae="autoencoder_kl", resolution=32)


@pytest.fixture(scope="module")
def kl_model(kl_export):
    return load_export(str(kl_export.dir))


@pytest.fixture(scope="module")
def v_model(tmp_path_factory):
    export = build_tiny_export(tmp_path_factory.mktemp("v_export"), vae="autoencoder_kl", resolution=32,
                               prediction_type="v_prediction")
    return load_export(str(export.dir))


def diffusers_pipeline(cls, model, sampler_name: str = "ddim"):
    """A diffusers pipeline of `cls` on the same UNet, VAE module and scheduler config (no text encoder)."""
    pipe = cls(vae=model.sampler().vae.model, text_encoder=None, tokenizer=None, unet=model.unet,
               scheduler=make_scheduler(sampler_name, model.scheduler_config), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("model_name", ["kl_model", "v_model"])
def test_ddim_matches_stable_diffusion_pipeline(model_name, request) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model = request.getfixturevalue(model_name)
    sampler = model.sampler(text_states="full")
    prompts, seeds = ["a red circle at the top", "two blue squares"], [3, 11]
    params = SampleParams(sampler="ddim", steps=12, guidance=3.5, height=32, width=32)
    ours = np.stack([img.array for img in sampler.txt2img(prompts, seeds, params, batch_size=2)])

    # The same UNet, VAE module and scheduler config, the same text states as prompt_embeds.
    cond = sampler.encode_text(prompts)
    uncond = sampler.encode_text([""] * len(prompts))
    assert cond.states.shape[1] == sampler.text_encoder.context_length and cond.mask is None
    pipe = diffusers_pipeline(StableDiffusionPipeline, model)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == model.scheduler_config["prediction_type"]
    theirs = pipe(prompt_embeds=cond.states, negative_prompt_embeds=uncond.states, guidance_scale=3.5,
                  num_inference_steps=12, height=32, width=32, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)  # bitwise equal on this machine
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # prompts/seeds really differ


def test_v_prediction_export_samples_with_the_closed_form_ddim_update(v_model) -> None:
    # Deterministic DDIM (eta 0) in closed form for a v-predicting UNet, alpha = sqrt(abar), sigma = sqrt(1 - abar):
    # x0 = alpha_t x - sigma_t v, eps = sigma_t x + alpha_t v, x <- alpha_prev x0 + sigma_prev eps,
    # with abar_prev = 1 after the last step (set_alpha_to_one).
    from diffusers.utils.torch_utils import randn_tensor

    sampler = v_model.sampler()
    for name in ("ddpm", "ddim", "dpmsolver++", "euler"):
        assert make_scheduler(name, v_model.scheduler_config).config.prediction_type == "v_prediction", name
    cond = sampler.encode_text(["a green triangle on the left"])
    params = SampleParams(sampler="ddim", steps=4, guidance=1.0)
    ours = sampler.denoise(cond, None, [7], params)

    abar = make_scheduler("ddim", v_model.scheduler_config).alphas_cumprod.double()
    x = randn_tensor(ours.shape, generator=[torch.Generator().manual_seed(7)], dtype=torch.float32).double()
    timesteps = [751, 501, 251, 1]  # 4 "leading" steps of 1000, steps_offset 1
    for t, t_prev in zip(timesteps, timesteps[1:] + [None]):
        v = sampler.unet(x.float(), t, encoder_hidden_states=cond.states, encoder_attention_mask=cond.mask).sample
        alpha, sigma = abar[t].sqrt(), (1 - abar[t]).sqrt()
        x0, eps = alpha * x - sigma * v.double(), sigma * x + alpha * v.double()
        prev = abar[t_prev] if t_prev is not None else torch.tensor(1.0, dtype=torch.float64)
        x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    torch.testing.assert_close(ours.double(), x, rtol=0, atol=1e-4)
    # Read as epsilon, the same UNet outputs give other latents: the export's prediction_type is what counts.
    misread = v_model.sampler()
    misread.scheduler_config["prediction_type"] = "epsilon"
    assert (misread.denoise(cond, None, [7], params) - ours).abs().max() > 0.1


@pytest.mark.parametrize("strength", [0.3, 0.7])
@pytest.mark.parametrize("sampler_name", ["ddim", "euler", "dpmsolver++"])
def test_img2img_matches_stable_diffusion_img2img_pipeline(kl_model, strength, sampler_name) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    sampler = kl_model.sampler(text_states="full")
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    prompts, seeds = ["a red circle at the top", "two blue squares"], [3, 11]
    params = SampleParams(sampler=sampler_name, steps=10, guidance=3.5)
    ours = np.stack([img.array for img in sampler.img2img(init, prompts, seeds, strength, params, batch_size=2)])

    # The pipeline encodes the image itself: each image's generator samples the VAE posterior, then
    # draws that image's noise, as ours does.
    cond, uncond = sampler.encode_text(prompts), sampler.encode_text([""] * len(prompts))
    pipe = diffusers_pipeline(StableDiffusionImg2ImgPipeline, kl_model, sampler_name)
    theirs = pipe(prompt_embeds=cond.states, negative_prompt_embeds=uncond.states,
                  image=[init] * len(prompts), strength=strength, guidance_scale=3.5,
                  num_inference_steps=10, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    init_array = np.asarray(init, dtype=np.float32) / 255
    assert np.abs(ours[0] - init_array).max() > 1e-3 and np.abs(ours[0] - ours[1]).max() > 1e-3


def test_img2img_endpoints_and_determinism(kl_model, tmp_path) -> None:
    from PIL import Image

    sampler = kl_model.sampler()
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    params = SampleParams(sampler="ddim", steps=8, guidance=2.0)
    zero = sampler.img2img(init, ["a cat"], [5], strength=0.0, params=params)[0]
    assert np.array_equal(zero.to_uint8(), np.asarray(init))
    # Bit-equal by construction: strength 1 is txt2img itself (Sampler.img2img returns txt2img's result),
    # so both calls run the same code path on the same batch (batch_size 1 here) on this machine, the
    # first promise of docs/architecture.md "Reproducibility". An img2img loop started from the noised
    # init latents instead would draw the posterior sample first and give another image.
    full = sampler.img2img(init, ["a cat"], [5], strength=1.0, params=params, batch_size=1)[0]
    txt = sampler.txt2img(["a cat"], [5], params, batch_size=1)[0]
    assert np.array_equal(full.array, txt.array) and full.meta["strength"] == 1.0
    half_a = sampler.img2img(init, ["a cat"], [5], strength=0.5, params=params)[0]
    half_b = sampler.img2img(init, ["a cat"], [5], strength=0.5, params=params)[0]
    assert np.array_equal(half_a.array, half_b.array)
    assert not np.array_equal(half_a.array, txt.array)
    for name in ("ddpm", "dpmsolver++", "euler"):
        p = SampleParams(sampler=name, steps=6, guidance=2.0)
        a = sampler.img2img(init, ["a cat"], [5], strength=0.6, params=p)[0]
        b = sampler.img2img(init, ["a cat"], [5], strength=0.6, params=p)[0]
        assert np.isfinite(a.array).all() and np.array_equal(a.array, b.array), name


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmsolver++", "euler"])
def test_each_sampler_is_deterministic_per_seed(kl_model, name) -> None:
    sampler = kl_model.sampler()
    params = SampleParams(sampler=name, steps=6, guidance=3.0, negative_prompt="blurry")
    a = sampler.txt2img(["a", "b b b"], [1, 2], params, batch_size=2)
    b = sampler.txt2img(["a", "b b b"], [1, 2], params, batch_size=2)
    c = sampler.txt2img(["a"], [9], params)
    for x, y in zip(a, b):
        assert np.array_equal(x.array, y.array)
    assert not np.array_equal(a[0].array, c[0].array)
    # One image depends on its own seed only, not on its batch neighbours.
    solo = sampler.txt2img(["b b b"], [2], params, batch_size=1)[0]
    np.testing.assert_allclose(solo.array, a[1].array, atol=1e-5)


def test_real_token_conditioning_and_truncation(kl_model) -> None:
    sampler = kl_model.sampler()
    long_prompt = " ".join(["word"] * 120)
    cond = sampler.encode_text(["short", long_prompt])
    assert cond.truncated == [False, True]
    assert cond.lengths[1] == sampler.text_encoder.context_length
    assert cond.mask is not None and cond.mask[0].sum() == cond.lengths[0]
    assert torch.all(cond.states[0, cond.lengths[0]:] == 0)


def test_outputs_png_metadata_grid_and_index(kl_model, tmp_path) -> None:
    sampler = kl_model.sampler()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\nblue square\n")
    requests = load_prompts(str(prompts), base_seed=100)
    assert [(r.index, r.prompt, r.seed) for r in requests] == [(0, "a red circle", 100), (1, "blue square", 101)]
    params = SampleParams(sampler="euler", steps=5, guidance=2.5)
    rows = generate_to_dir(sampler, requests, params, str(tmp_path / "out"), batch_size=2)
    write_index(str(tmp_path / "out" / INDEX_NAME), rows)
    from PIL import Image

    img = Image.open(tmp_path / "out" / "000001.png")
    assert img.text["prompt"] == "blue square" and img.text["seed"] == "101"
    assert img.text["steps"] == "5" and img.text["guidance"] == "2.5" and img.text["sampler"] == "euler"
    meta = read_png_meta(str(tmp_path / "out" / "000001.png"))
    assert meta["seed"] == 101 and meta["guidance"] == 2.5
    lines = [json.loads(x) for x in (tmp_path / "out" / INDEX_NAME).read_text().splitlines()]
    assert [r["file"] for r in lines] == ["000000.png", "000001.png"] and lines[0]["prompt"] == "a red circle"
    arrays = [np.asarray(Image.open(tmp_path / "out" / r["file"])) for r in lines]
    save_grid(str(tmp_path / "out" / GRID_NAME), arrays, columns=2)
    grid = np.asarray(Image.open(tmp_path / "out" / GRID_NAME))
    # 32 px samples are shown x4 in the grid (nearest: each pixel a 4x4 block), the files keep their 32 px
    assert read_png_meta(str(tmp_path / "out" / GRID_NAME))["display_scale"] == 4
    assert grid.shape == (128 + 4, 256 + 6, 3)
    enlarged = [a.repeat(4, axis=0).repeat(4, axis=1) for a in arrays]
    assert np.array_equal(grid[2:130, 2:130], enlarged[0]) and np.array_equal(grid[2:130, 132:260], enlarged[1])
    assert Image.open(tmp_path / "out" / "000000.png").size == (32, 32)
    assert contact_sheet(arrays * 3).shape[:2] == (2 * 32 + 6, 3 * 32 + 8)
    # The promise (docs/architecture.md, "Reproducibility"): the same batch on the same machine gives the same bytes; the
    # same request in another batch composition gives the same image within one uint8 level.
    same_batch = generate_to_dir(sampler, requests, params, str(tmp_path / "same_batch"), batch_size=2)
    assert [r["sha256"] for r in same_batch] == [r["sha256"] for r in rows]
    alone = generate_to_dir(sampler, requests[:1], params, str(tmp_path / "alone"), batch_size=1)
    alone_pixels = np.asarray(Image.open(tmp_path / "alone" / alone[0]["file"])).astype(int)
    assert np.abs(alone_pixels - arrays[0].astype(int)).max() <= 1
