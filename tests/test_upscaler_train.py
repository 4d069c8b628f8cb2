"""The upscaler stage in training: low-res pairs through the real feeder (fixed per key and
epoch) and the refusals of set-ups that cannot train, in the config and through the job."""

from __future__ import annotations

import pytest
import torch

from latentforge.config import ConfigError
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from latentforge.training import data as tdata
from latentforge.training.config import TrainConfig
from latentforge.upscaler.training import upscaler_setup, upscaler_unet
from tests.harness.sr_scenes import feed, write_scene_latents


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    clip = save_tiny_clip_checkpoint(root / "clip.safetensors")
    return write_scene_latents(root / "latents", str(clip), count=48, resolution=32, shard_size=24)


def upscaler_config(info, **overrides) -> TrainConfig:
    return TrainConfig(**{"data": str(info.dir), "stage": "upscaler", "lowres_factor": 2, "max_noise_level": 250,
                          "batch_size": 8, "shuffle_buffer": 16, "ema_decay": 0, "cfg_dropout": 0.0, **overrides})


def test_lowres_pairs_are_fixed_per_key_and_epoch_so_a_resume_sees_the_same_pairs(scenes) -> None:
    config = upscaler_config(scenes, lowres_blur=1.5, lowres_jpeg=40)
    plan = tdata.plan_data(scenes.manifest, 1, config.samples_per_step, config.shuffle_buffer, config.seed)
    steps = 2 * plan.steps_per_epoch
    whole = feed(scenes, config, plan, 0, steps)
    resumed = feed(scenes, config, plan, 3, steps - 3)  # a restart after step 3, mid-epoch
    for a, b in zip(whole[3:], resumed):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["lowres"], b["lowres"])
    assert whole[0]["lowres"].shape == (8, 3, 16, 16)  # latent size of 32 px patchify(2) latents
    first = {k: x for batch in whole[:plan.steps_per_epoch] for k, x in zip(batch["keys"], batch["lowres"])}
    second = {k: x for batch in whole[plan.steps_per_epoch:] for k, x in zip(batch["keys"], batch["lowres"])}
    both = sorted(set(first) & set(second))
    assert both and all(not torch.equal(first[k], second[k]) for k in both)  # fresh degradation per epoch
    again = feed(scenes, upscaler_config(scenes, lowres_blur=1.5, lowres_jpeg=40, seed=1), plan, 0, 1)
    assert not torch.equal(again[0]["lowres"], whole[0]["lowres"])  # the seed is part of the draw


def test_upscaler_refuses_data_without_pixels_and_a_factor_that_does_not_divide(scenes, tmp_path) -> None:
    from tests.harness.latent_shards import write_latent_dataset

    plain = write_latent_dataset(tmp_path / "plain", shard_sizes=[8])
    with pytest.raises(ConfigError, match="--store-pixels"):
        upscaler_setup(upscaler_config(plain), plain.manifest)
    with pytest.raises(ConfigError, match="does not divide"):
        upscaler_setup(upscaler_config(scenes, lowres_factor=3), scenes.manifest)
    with pytest.raises(ConfigError, match="max_noise_level"):
        upscaler_config(scenes, max_noise_level=1000)
    config = upscaler_unet(upscaler_config(scenes), scenes.manifest, 12, 32, 16)
    assert (config["in_channels"], config["out_channels"], config["num_class_embeds"]) == (15, 12, 251)


def test_job_refuses_bad_upscaler_runs_with_one_line_before_any_worker(scenes, tmp_path, capsys) -> None:
    import json

    from jobs.train import main
    from tests.harness.latent_shards import write_latent_dataset

    plain = write_latent_dataset(tmp_path / "plain", shard_sizes=[8])
    runs = tmp_path / "runs"
    common = ["--stage", "upscaler", "--lowres-factor", "2", "--storage-path", str(runs), "--no-mlflow"]
    assert main(["--preset", "tiny", "--data", str(plain.dir), *common]) == 2
    assert "precompute the data with --store-pixels" in capsys.readouterr().err
    # a UNet config file made for SD-style 4-channel latents under the scenes' 12-channel autoencoder
    unet_file = tmp_path / "unet.json"
    unet_file.write_text(json.dumps({"in_channels": 7, "out_channels": 4, "cross_attention_dim": 32,
                                     "num_class_embeds": 1000, "block_out_channels": [32, 64],
                                     "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}))
    assert main(["--preset", "tiny", "--unet", str(unet_file), "--data", str(scenes.dir), *common]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "in_channels 7" in line]
    assert len(errors) == 1 and "latents have 12 channels (+ 3 image channels)" in errors[0]
    assert not runs.exists()  # refused before anything was started or written


def test_the_upscaler_learns_the_scaled_residual_over_the_bicubic_upsample(scenes) -> None:
    """Each batch latent is (latent - latent of its low-res input's bicubic upsample) * scale: added back
    to that base it decodes to the real image, and the base alone decodes to the bicubic upsample."""
    from latentforge import formats
    from latentforge.models.vae import load_vae_from_manifest
    from latentforge.pixels import to_pixels
    from latentforge.upscaler.degradation import Degradation, bicubic_upsample
    from latentforge.upscaler.residual import RESIDUAL_SCALE

    config = upscaler_config(scenes)
    plan = tdata.plan_data(scenes.manifest, 1, config.samples_per_step, config.shuffle_buffer, config.seed)
    batch = feed(scenes, config, plan, 0, 1)[0]  # epoch 0
    rows = {r["__key__"]: r for r in tdata.read_positions(str(scenes.dir), plan, range(plan.total))}
    vae = load_vae_from_manifest(scenes.manifest)
    for key, residual in zip(batch["keys"], batch["latents"]):
        high = formats.decode_npy(rows[key][formats.PIXELS_MEMBER])[None]  # (1, 32, 32, 3)
        bicubic = bicubic_upsample(Degradation(2, seed=config.seed).apply(high[0], key, 0)[None], 32)
        base = vae.encode(to_pixels(bicubic), mode="mean")
        assert torch.allclose(vae.decode(base), to_pixels(bicubic), atol=1e-6)
        assert torch.allclose(vae.decode(base + residual[None] / RESIDUAL_SCALE), to_pixels(high), atol=1e-5)


def test_no_residual_keeps_the_high_res_latent_and_records_no_residual_scale(scenes) -> None:
    """--no-residual: SD x4's recipe, the UNet learns the stored latent itself (the exportable kind)."""
    from latentforge import formats
    from latentforge.upscaler.training import upscaler_setup

    config = upscaler_config(scenes, residual=False)
    plan = tdata.plan_data(scenes.manifest, 1, config.samples_per_step, config.shuffle_buffer, config.seed)
    batch = feed(scenes, config, plan, 0, 1)[0]
    rows = {r["__key__"]: r for r in tdata.read_positions(str(scenes.dir), plan, range(plan.total))}
    for key, latent in zip(batch["keys"], batch["latents"]):
        stored = torch.from_numpy(formats.decode_npy(rows[key]["latent.npy"])).to(latent.dtype)
        assert torch.equal(latent, stored)
    assert "residual_scale" not in upscaler_setup(config, scenes.manifest).record(scenes.manifest)
    assert "residual_scale" in upscaler_setup(upscaler_config(scenes), scenes.manifest).record(scenes.manifest)
