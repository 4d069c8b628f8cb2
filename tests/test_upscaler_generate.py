"""Super-resolution at generate time: --upscaler on given images, the cascade, and its refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentforge.config import ConfigError
from latentforge.generation.config import GenerateConfig
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from latentforge.training.config import TrainConfig
from tests.harness.sr_scenes import export, make_trainer, write_scene_latents

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained tiny exports: a 16 px base, a 16 -> 32 px upscaler, a 8 -> 32 px one (factor 4) and a
    32 -> 64 px one (the second stage of a two-stage cascade)."""
    root = tmp_path_factory.mktemp("cascade")
    clip = str(save_tiny_clip_checkpoint(root / "clip.safetensors"))
    low = write_scene_latents(root / "lat16", clip, count=8, resolution=16, shard_size=8)
    high = write_scene_latents(root / "lat32", clip, count=8, resolution=32, shard_size=8)
    higher = write_scene_latents(root / "lat64", clip, count=4, resolution=64, shard_size=4)
    upscaler = dict(stage="upscaler", max_noise_level=100, ema_decay=0, batch_size=4)
    return {
        "base": export(make_trainer(low, TrainConfig(data=str(low.dir), ema_decay=0)), low, root / "base"),
        "sr": export(make_trainer(high, TrainConfig(data=str(high.dir), lowres_factor=2, **upscaler)), high,
                     root / "sr"),
        "sr4": export(make_trainer(high, TrainConfig(data=str(high.dir), lowres_factor=4, **upscaler)), high,
                      root / "sr4"),
        "sr64": export(make_trainer(higher, TrainConfig(data=str(higher.dir), lowres_factor=2, **upscaler)), higher,
                       root / "sr64"),
    }


@pytest.fixture(scope="module")
def labelled_base(models, tmp_path_factory) -> str:
    """An untrained class-conditional 16 px base (shape: circle / square / triangle) on the upscalers' text
    encoder: its random class embedding gives each label its own images."""
    from accelerate import Accelerator

    from latentforge.conditioning.embedding import with_conditions
    from latentforge.conditioning.spec import ConditionSet
    from latentforge.config import config_to_dict
    from latentforge.manifest import manifest_digest
    from latentforge.models.unet import resolve_unet_config
    from latentforge.precompute.config import PrecomputeConfig
    from latentforge.training.data import read_empty_caption
    from latentforge.training.export_writer import write_export
    from latentforge.training.loop import DiffusionTrainer
    from tests.harness.condition_scenes import precompute_in_process, write_scene_shards

    root = tmp_path_factory.mktemp("labelled")
    clip = str(Path(models["base"]).parent / "clip.safetensors")
    manifest = precompute_in_process(PrecomputeConfig(
        input=str(write_scene_shards(root / "ingest", [6])), output=str(root / "lat"), vae_type="patchify",
        patch_size=2, text_encoder="lf-tiny-clip", text_encoder_weights=clip, text_layer="last", resolution=16,
        dtype="fp32", batch_size=6, fidelity_samples=0, condition=["shape:class"]))
    conditions = ConditionSet.from_manifest(manifest)
    config = TrainConfig(data=str(root / "lat"), ema_decay=0)
    trainer = DiffusionTrainer(config, with_conditions(resolve_unet_config("tiny", 12, 32, 8), conditions),
                               Accelerator(cpu=True), read_empty_caption(str(root / "lat"), manifest),
                               manifest.extra["latent"], conditions=conditions)
    write_export(str(root / "base"), trainer.export_model(), trainer.noise_scheduler, str(root / "lat"),
                 manifest_digest(str(root / "lat")), manifest, config_to_dict(config), 0, None)
    return str(root / "base")


def generate(tmp_path, out: str, **options) -> list[np.ndarray]:
    from pipelines.generate import run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\n")
    config = GenerateConfig(**{"prompts": str(prompts), "out": str(tmp_path / out), "steps": 3, "guidance": 2.0,
                               "seed": 5, "mlflow": False, "progress": False, **options})
    run(config)
    files = sorted(f for f in os.listdir(tmp_path / out) if f[0].isdigit() and f.endswith(".png"))
    return [np.asarray(Image.open(tmp_path / out / f).convert("RGB")) for f in files]


def test_cascade_equals_the_stages_run_by_hand_with_the_same_seeds(models, tmp_path) -> None:
    cascade = generate(tmp_path, "cascade", model=models["base"], upscaler=models["sr"], noise_level=20)
    base = generate(tmp_path, "base", model=models["base"])
    by_hand = generate(tmp_path, "by_hand", upscaler=models["sr"], init_images=str(tmp_path / "base"),
                       noise_level=20)
    assert [a.shape for a in cascade] == [(32, 32, 3)] * 2 and [a.shape for a in base] == [(16, 16, 3)] * 2
    for a, b in zip(cascade, by_hand):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    other_level = generate(tmp_path, "level", upscaler=models["sr"], init_images=str(tmp_path / "base"),
                           noise_level=90)
    assert any(not np.array_equal(a, b) for a, b in zip(by_hand, other_level))  # the level reaches the UNet


def test_a_two_stage_cascade_from_the_job_with_upscaler_repeated(models, tmp_path) -> None:
    """`jobs/generate.py --model BASE --upscaler SR --upscaler SR2`: 16 -> 32 -> 64 px, the second stage on
    the first one's output, as running it by hand on the 32 px cascade's PNGs."""
    from jobs.demo import load_job  # jobs/generate.py as `python jobs/generate.py` loads it

    main = load_job("generate")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\n")
    common = ["--prompts", str(prompts), "--steps", "3", "--guidance", "2.0", "--seed", "5", "--no-mlflow",
              "--no-progress"]
    assert main(["--model", models["base"], "--upscaler", models["sr"], "--upscaler", models["sr64"],
                 "--out", str(tmp_path / "two"), *common]) == 0
    assert main(["--model", models["base"], "--upscaler", models["sr"], "--out", str(tmp_path / "one"), *common]) == 0
    assert main(["--upscaler", models["sr64"], "--init-images", str(tmp_path / "one"), "--out",
                 str(tmp_path / "by_hand"), *common]) == 0
    read = lambda d: [np.asarray(Image.open(tmp_path / d / f"00000{i}.png").convert("RGB")) for i in (0, 1)]  # noqa: E731
    assert [a.shape for a in read("two")] == [(64, 64, 3)] * 2
    for a, b in zip(read("two"), read("by_hand")):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_conditions_steer_the_base_of_a_cascade(models, labelled_base, tmp_path) -> None:
    circle = generate(tmp_path, "circle", model=labelled_base, upscaler=models["sr"], condition=["shape=circle"])
    generate(tmp_path, "base_circle", model=labelled_base, condition=["shape=circle"])
    by_hand = generate(tmp_path, "by_hand", upscaler=models["sr"], init_images=str(tmp_path / "base_circle"))
    for a, b in zip(circle, by_hand):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    square = generate(tmp_path, "square", model=labelled_base, upscaler=models["sr"], condition=["shape=square"])
    assert any(not np.array_equal(a, b) for a, b in zip(circle, square))  # the label reached the base
    with pytest.raises(ConfigError, match="valid labels: circle, square, triangle"):
        generate(tmp_path, "hexagon", model=labelled_base, upscaler=models["sr"], condition=["shape=hexagon"])
    with pytest.raises(ConfigError, match="NAME one of none"):  # a base without conditions: never dropped silently
        generate(tmp_path, "plain", model=models["base"], upscaler=models["sr"], condition=["shape=circle"])
    with pytest.raises(ConfigError, match="with --init-images there is none"):
        generate(tmp_path, "given", upscaler=models["sr"], init_images=str(tmp_path / "base_circle"),
                 condition=["shape=circle"])
    assert not any((tmp_path / name).exists() for name in ("hexagon", "plain", "given"))  # refused before writing


@pytest.mark.slow
def test_ray_mode_upscales_through_an_actor_pool_as_one_process_does(models, tmp_path, ray_session) -> None:
    """--ray: a cascade and --init-images through a Ray Data pool of 2 actors equal the in-process run."""
    from pipelines.generate import run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a red circle number {i}" for i in range(5)) + "\n")
    common = dict(prompts=str(prompts), steps=2, seed=5, mlflow=False, progress=False, batch_size=2, device="cpu")
    pool = dict(ray=True, concurrency=2, num_cpus_per_actor=1)
    local = run(GenerateConfig(out=str(tmp_path / "local"), model=models["base"], upscaler=models["sr"], **common))
    pooled = run(GenerateConfig(out=str(tmp_path / "pool"), model=models["base"], upscaler=models["sr"], **common,
                                **pool))
    assert (local.generated, pooled.generated, pooled.extra["where"]) == (5, 5, "Ray Data actor pool")
    generate(tmp_path, "base", model=models["base"])  # 2 low-res inputs for --init-images
    given = run(GenerateConfig(out=str(tmp_path / "given"), upscaler=models["sr"], init_images=str(tmp_path / "base"),
                               **{**common, "prompts": "a shape"}, **pool))
    assert given.generated == 2
    read = lambda d: {p.name: np.asarray(Image.open(p).convert("RGB")).astype(int)  # noqa: E731
                      for p in sorted((tmp_path / d).glob("0*.png"))}
    assert read("local").keys() == read("pool").keys() and len(read("given")) == 2
    for name, image in read("local").items():
        assert np.abs(image - read("pool")[name]).max() <= 1, name
    rows = [line for line in (tmp_path / "pool" / "index.jsonl").read_text().splitlines() if line]
    assert len(rows) == 5


def test_upscaler_steps_and_guidance_are_the_upscalers_own(models, tmp_path) -> None:
    """--upscaler-steps / --upscaler-guidance: the base keeps --steps / --guidance, every SR stage takes these."""
    from latentforge.generation.outputs import read_png_meta

    cascade = generate(tmp_path, "cascade", model=models["base"], upscaler=models["sr"], upscaler_steps=5,
                       upscaler_guidance=1.0)
    generate(tmp_path, "base", model=models["base"])  # steps 3, guidance 2.0
    by_hand = generate(tmp_path, "by_hand", upscaler=models["sr"], init_images=str(tmp_path / "base"),
                       steps=5, guidance=1.0)
    for a, b in zip(cascade, by_hand):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    meta = read_png_meta(str(tmp_path / "cascade" / "000000.png"))
    assert (meta["steps"], meta["guidance"]) == (5, 1.0)
    shared = generate(tmp_path, "shared", model=models["base"], upscaler=models["sr"])
    assert any(not np.array_equal(a, b) for a, b in zip(cascade, shared))  # the SR stage did change
    with pytest.raises(ValueError, match="upscaler_steps"):
        GenerateConfig(prompts="p", out="o", upscaler_steps=0)


def test_a_rerun_redoes_only_the_missing_images_and_refuses_other_settings(models, tmp_path) -> None:
    from pipelines.generate import run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\na green circle at the bottom\n")
    config = dict(prompts=str(prompts), out=str(tmp_path / "out"), model=models["base"], upscaler=models["sr"],
                  steps=2, seed=5, mlflow=False, progress=False, batch_size=2)
    first = run(GenerateConfig(**config))
    assert (first.generated, first.skipped) == (3, 0)
    out = tmp_path / "out"
    before = np.asarray(Image.open(out / "000001.png").convert("RGB")).astype(int)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("0*.png") if p.name != "000001.png"}
    (out / "000001.png").unlink()  # as a run killed before its last batch
    again = run(GenerateConfig(**config))
    assert (again.generated, again.skipped) == (1, 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0*.png") if p.name != "000001.png"} == kept
    # redone alone, not in its first batch of 2: the same image within one uint8 level (docs/architecture.md)
    assert np.abs(np.asarray(Image.open(out / "000001.png").convert("RGB")).astype(int) - before).max() <= 1
    assert len((out / "index.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ConfigError, match="different settings.*noise_level"):
        run(GenerateConfig(**{**config, "noise_level": 50}))


def test_refusals_before_any_model_loads(models, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"takes 8x8 px low-res images but the base model .* makes 16x16 px"):
        generate(tmp_path, "a", model=models["base"], upscaler=models["sr4"])
    with pytest.raises(ConfigError, match="is a base model, not an upscaler"):
        generate(tmp_path, "b", model=models["base"], upscaler=models["base"])
    with pytest.raises(ConfigError, match=r"takes 16x16 px"):  # SR -> SR: 32 px into a 16 px input
        generate(tmp_path, "c", model=models["base"], upscaler=f"{models['sr']},{models['sr']}")
    (tmp_path / "big").mkdir()
    Image.new("RGB", (20, 16)).save(tmp_path / "big" / "000000.png")
    with pytest.raises(ConfigError, match=r"000000.png is 16x20 px but the upscaler takes 16x16"):
        generate(tmp_path, "d", upscaler=models["sr"], init_images=str(tmp_path / "big"))
    with pytest.raises(ValueError, match=r"outside the upscaler's trained range \[0, 100\]"):
        generate(tmp_path, "e", model=models["base"], upscaler=models["sr"], noise_level=101)


def test_an_autoencoder_whose_channels_do_not_fit_the_unet_is_refused(models, tmp_path) -> None:
    import shutil

    from latentforge import storage

    broken = tmp_path / "broken"
    shutil.copytree(models["sr"], broken)
    data = storage.read_json(str(broken / "data_manifest.json"))
    data["models"]["vae"]["latent_channels"] = 4  # an SD-style autoencoder under a 12 + 3 channel UNet
    storage.atomic_write_json(str(broken / "data_manifest.json"), data)
    with pytest.raises(ConfigError, match="has 4 latent channels but its UNet takes 15"):
        generate(tmp_path, "x", model=models["base"], upscaler=str(broken))


def test_job_exits_2_with_one_line_for_a_size_mismatch(models, tmp_path) -> None:
    cmd = [sys.executable, str(REPO / "jobs" / "generate.py"), "--model", models["base"], "--upscaler", models["sr4"],
           "--prompts", "a red circle", "--out", str(tmp_path / "out"), "--no-mlflow"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "8x8 px" in line]
    assert len(errors) == 1 and "16x16 px" in errors[0]


def test_sampling_starts_at_the_last_timestep_and_decodes_over_the_bicubic_base(models) -> None:
    """One DDIM step runs the UNet at t = 999 on the pure-noise start (the training schedule's "leading"
    spacing ran it at t = 0), and a zero residual decodes to the bicubic upsample of the input."""
    import torch

    from latentforge.trained_model import load_export
    from latentforge.generation.sampler import SampleParams
    from latentforge.pixels import to_pixels
    from latentforge.upscaler.degradation import bicubic_upsample
    from latentforge.upscaler.sampling import Upscaler

    upscaler = Upscaler(load_export(models["sr"]))
    low = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    seen: list[int] = []
    forward = upscaler.unet.unet.forward
    upscaler.unet.unet.forward = lambda sample, t, **kw: seen.append(int(t)) or forward(sample, t, **kw)
    upscaler.upscale(low, ["a", "b"], [1, 2], SampleParams(sampler="ddim", steps=1, guidance=1.0), 0)
    assert seen == [999]
    zero = torch.zeros(2, 12, 16, 16)  # (B, C, h, w) residual latents
    assert torch.allclose(upscaler.sampler.vae.decode(zero), to_pixels(bicubic_upsample(low, 32)), atol=1e-6)


def test_a_zero_residual_is_the_bicubic_image_even_through_a_lossy_autoencoder(tmp_path) -> None:
    """The decoder's error on the bicubic base is taken out of the output: through a random (lossy)
    AutoencoderKL a zero residual still gives the bicubic upsample, not its reconstruction."""
    import torch
    from diffusers import AutoencoderKL

    from latentforge.models.vae import VaeSpec, load_vae
    from latentforge.upscaler.residual import BaseLatents, ResidualDecoder

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                  scaling_factor=0.5).save_pretrained(tmp_path / "vae")
    vae = load_vae(VaeSpec(type="autoencoder_kl", id=str(tmp_path / "vae")))
    low = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    pixels, base = BaseLatents(vae, 32)(low)  # (2, 3, 32, 32), (2, 4, 16, 16)
    decoder = ResidualDecoder(vae, 10.0)
    decoder.rebase(pixels, base)
    assert (vae.decode(base) - pixels).abs().max() > 0.1  # the autoencoder alone does not give the base back
    assert torch.allclose(decoder.decode(torch.zeros_like(base)), pixels, atol=1e-5)
