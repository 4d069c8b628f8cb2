"""The autoencoder stage's parts without Ray: data stream, loss, trainer, checkpoints, export.

Real parts throughout: ingest-format shards written with webdataset (tests/harness), a tiny
diffusers AutoencoderKL built from the stage's config, Accelerate on the CPU, torchmetrics.
Expected values come from direct diffusers / torch calls.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latentforge.autoencoder import data as aedata
from latentforge.autoencoder.config import AutoencoderTrainConfig
from latentforge.autoencoder.export_writer import measure_scaling_factor, write_autoencoder_export
from latentforge.autoencoder.losses import (AutoencoderLoss, LossConfigError, reconstruction_grid,
                                            reconstruction_metrics)
from latentforge.autoencoder.loop import AutoencoderTrainer
from latentforge.config import ConfigError
from latentforge.manifest import read_manifest
from latentforge.models.vae import VaeSpec, load_vae
from latentforge.precompute.preprocess import iter_ingest_shard, preprocess_sample
from latentforge.pixels import to_pixels
from tests.harness.ingest_shards import write_ingest_shards

RES = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: these models are tiny, and on a shared 2-core machine more threads only wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_ingest_shards(tmp_path_factory.mktemp("ae_ingest") / "shards", shard_sizes=(12, 12))


def _config(shards, **overrides) -> AutoencoderTrainConfig:
    values = dict(data=str(shards.dir), block_out_channels=[8, 16], norm_num_groups=4, latent_channels=4,
                  resolution=RES, steps=40, batch_size=4, lr=3e-3, warmup_steps=0, eval_every=0, val_samples=4)
    values.update(overrides)
    return AutoencoderTrainConfig(**values)


def _trainer(config: AutoencoderTrainConfig) -> AutoencoderTrainer:
    from accelerate import Accelerator

    return AutoencoderTrainer(config, Accelerator(cpu=True))


def _stream(shards, position=None, exclude=()) -> aedata.ImageStream:
    return aedata.ImageStream(str(shards.dir), ["00000", "00001"], RES, "bicubic", 0, 0, exclude, position)


# -- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"norm_num_groups": 3}, "norm_num_groups 3 does not divide"),
    ({"resolution": 17}, "not divisible by the downsampling factor 2"),
    ({"l1_weight": 0.0, "l2_weight": 0.0}, "no reconstruction loss"),
    ({"kl_weight": -1.0}, "kl_weight must be >= 0"),
    ({"mixed_precision": "fp16"}, "fp16 needs --use-gpu"),
    ({"discriminator": True, "disc_layers": 4}, "disc_layers 4 need images of at least 32 px"),
])
def test_config_refuses_bad_values(shards, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(shards, **overrides)


def test_job_refuses_a_bad_flag_with_exit_2(capsys) -> None:
    from jobs.train_autoencoder import main

    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", "--norm-num-groups", "3"])
    assert exc.value.code == 2
    assert "norm_num_groups 3 does not divide block_out_channels [8, 16]" in capsys.readouterr().err


# -- data ------------------------------------------------------------------------------------------

def test_stream_uses_precompute_preprocessing_and_leaves_out_held_out_and_undecodable(shards) -> None:
    keys, held = aedata.held_out(str(shards.dir), shards.manifest, 3, RES, "bicubic")
    last = {s.key: s for s in iter_ingest_shard(str(shards.dir / "00001.tar"))}
    assert keys == [k for k in last if k not in shards.undecodable][:3]  # empty captions are kept
    expected = preprocess_sample(last[keys[0]], RES, "bicubic", "center", 0, True)[1]
    np.testing.assert_array_equal(held[0], expected)

    stream = _stream(shards, exclude=keys)
    trainable = len(shards.keys) - len(shards.undecodable) - len(keys)
    images = stream.next_batch(trainable)  # exactly one epoch
    assert images.shape == (trainable, RES, RES, 3) and images.dtype == np.uint8
    assert stream.position.epoch == 1 and stream.position.images == trainable
    assert stream.position.skipped == {"undecodable_image": len(shards.undecodable)}
    held_bytes = {h.tobytes() for h in held}
    assert not any(image.tobytes() in held_bytes for image in images)


def test_stream_resumes_from_its_position_and_reorders_each_epoch(shards) -> None:
    stream = _stream(shards)
    stream.next_batch(5)
    saved = aedata.StreamPosition(**json.loads(json.dumps(stream.position.to_dict())))
    per_epoch = len(shards.keys) - len(shards.undecodable)
    rest = stream.next_batch(per_epoch + 5)  # crosses the epoch boundary
    resumed = _stream(shards, position=saved).next_batch(per_epoch + 5)
    np.testing.assert_array_equal(resumed, rest)
    first_epoch = _stream(shards).next_batch(per_epoch)
    second_epoch = _stream(shards).next_batch(2 * per_epoch)[per_epoch:]
    assert sorted(i.tobytes() for i in first_epoch) == sorted(i.tobytes() for i in second_epoch)
    assert [i.tobytes() for i in first_epoch] != [i.tobytes() for i in second_epoch]


def test_deal_shards_needs_a_shard_per_worker(shards) -> None:
    assert aedata.deal_shards(shards.manifest, 2) == [["00000"], ["00001"]]
    with pytest.raises(ValueError, match="2 shard\\(s\\) for 3 workers"):
        aedata.deal_shards(shards.manifest, 3)


# -- loss and metrics ------------------------------------------------------------------------------

def test_loss_terms_are_the_documented_formulas(shards) -> None:
    config = _config(shards, l1_weight=0.5, l2_weight=2.0, kl_weight=0.01)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1, torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    mean, logvar = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    terms = AutoencoderLoss(config, torch.device("cpu"))(x, y, mean, logvar)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    kl = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).kl().mean()
    torch.testing.assert_close(terms["kl"], kl)
    expected = 0.5 * (x - y).abs().mean() + 2.0 * (x - y).pow(2).mean() + 0.01 * kl
    torch.testing.assert_close(terms["total"], expected)
    assert "lpips" not in terms


def test_lpips_term_from_a_local_weights_file(shards, tmp_path) -> None:
    from safetensors.torch import save_model
    from torchmetrics.functional.image.lpips import _LPIPS

    weights = tmp_path / "lpips.safetensors"
    network = _LPIPS(pretrained=False, net="squeeze", pnet_rand=True)
    for parameter in network.lins.parameters():  # LPIPS's linear weights are non-negative
        parameter.data.abs_()
    save_model(network, str(weights))
    loss = AutoencoderLoss(_config(shards, lpips_weights=str(weights), lpips_net="squeeze", lpips_weight=3.0),
                           torch.device("cpu"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = x.flip(-1)
    terms = loss(x, y, torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16))
    same = loss(x, x, torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16))
    assert float(terms["lpips"]) > 0 and float(same["lpips"]) < 1e-6
    torch.testing.assert_close(terms["lpips"], network(y, x).mean())  # the file's weights, not random ones
    torch.testing.assert_close(terms["total"], terms["l1"] + 3.0 * terms["lpips"])
    with pytest.raises(LossConfigError, match="do not fit torchmetrics' LPIPS 'alex' network"):
        AutoencoderLoss(_config(shards, lpips_weights=str(weights), lpips_net="alex"), torch.device("cpu"))


def test_psnr_ssim_and_grid() -> None:
    x = torch.zeros(2, 3, 16, 16)
    metrics = reconstruction_metrics(x, x + 0.2)  # 0.1 in [0, 1] units: PSNR = 20 dB
    assert metrics["psnr"] == pytest.approx(20.0, abs=1e-3) and metrics["ssim"] < 1.0
    assert reconstruction_metrics(x, x)["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert reconstruction_grid(x, x, scale=4).size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)


# -- training --------------------------------------------------------------------------------------

def test_loss_falls_and_reconstructions_improve(shards) -> None:
    config = _config(shards, steps=40)
    trainer = _trainer(config)
    keys, held = aedata.held_out(str(shards.dir), shards.manifest, 4, RES, "bicubic")
    stream = _stream(shards, exclude=keys)
    before = reconstruction_metrics(*trainer.reconstruct(held))["psnr"]
    losses = [trainer.train_step(stream.next_batch(config.batch_size)).loss for _ in range(config.steps)]
    after = reconstruction_metrics(*trainer.reconstruct(held))["psnr"]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert after > before + 3.0


@pytest.mark.parametrize("discriminator", [False, True])
def test_checkpoint_resume_continues_bit_identically(shards, tmp_path, discriminator) -> None:
    config = _config(shards, steps=6, discriminator=discriminator, disc_layers=2, disc_channels=8, disc_start=2)
    reference, stream = _trainer(config), _stream(shards)
    for _ in range(3):
        reference.train_step(stream.next_batch(4))
    reference.save(str(tmp_path), {"mlflow_run_id": "x"}, {"position": stream.position.to_dict()})
    for _ in range(3):
        reference.train_step(stream.next_batch(4))

    resumed = _trainer(config)
    state, rank_state = resumed.load(str(tmp_path))
    assert (resumed.step, state["mlflow_run_id"]) == (3, "x")
    stream = _stream(shards, position=aedata.StreamPosition(**rank_state["position"]))
    for _ in range(3):
        resumed.train_step(stream.next_batch(4))
    for name, tensor in reference.vae.state_dict().items():
        assert torch.equal(tensor, resumed.vae.state_dict()[name]), name
    if discriminator:
        for name, tensor in reference.discriminator.state_dict().items():
            assert torch.equal(tensor, resumed.discriminator.state_dict()[name]), name


def test_discriminator_option_starts_at_disc_start_and_trains_both(shards) -> None:
    config = _config(shards, steps=4, discriminator=True, disc_layers=2, disc_channels=8, disc_start=2,
                     disc_weight=0.5)
    trainer, stream = _trainer(config), _stream(shards)
    initial = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    seen = []
    for _ in range(config.steps):
        trainer.train_step(stream.next_batch(4))
        seen.append(sorted(trainer.last_terms))
    assert "g_adv" not in seen[1] and "d_loss" not in seen[1]  # steps 1-2: before disc_start
    assert {"g_adv", "d_loss"} <= set(seen[2]) and {"g_adv", "d_loss"} <= set(seen[3])
    terms = trainer.last_terms
    reconstruction = terms["l1"] + config.kl_weight * terms["kl"]
    assert terms["total"] == pytest.approx(reconstruction + 0.5 * terms["g_adv"], rel=1e-5)
    assert any(not torch.equal(v, initial[k]) for k, v in trainer.discriminator.state_dict().items())


# -- export ----------------------------------------------------------------------------------------

def test_export_reloads_with_from_pretrained_and_encodes_identically(shards, tmp_path) -> None:
    from diffusers import AutoencoderKL

    config = _config(shards, steps=5)
    trainer, stream = _trainer(config), _stream(shards)
    for _ in range(config.steps):
        trainer.train_step(stream.next_batch(4))
    sample = _stream(shards).next_batch(12)
    scale, std = measure_scaling_factor(trainer.vae, sample, seed=3, batch_size=5)
    export = tmp_path / "export"
    write_autoencoder_export(str(export), trainer.vae, scale, config={"steps": 5}, data_dir=str(shards.dir),
                             data_digest="d" * 64, step=5, mlflow_run_id=None)

    reloaded = AutoencoderKL.from_pretrained(str(export), use_safetensors=True).eval()
    assert reloaded.config.scaling_factor == pytest.approx(scale, rel=1e-12)
    pixels = to_pixels(sample)
    with torch.no_grad():
        mine = trainer.vae.eval().encode(pixels).latent_dist
        theirs = reloaded.encode(pixels).latent_dist
        assert torch.equal(mine.mean, theirs.mean) and torch.equal(mine.std, theirs.std)
        # SD's rule, recomputed with diffusers directly: the scaled latents have unit std.
        generator = torch.Generator().manual_seed(3)
        raw = torch.cat([reloaded.encode(pixels[i:i + 5]).latent_dist.sample(generator) for i in range(0, 12, 5)])
    assert float(raw.std()) == pytest.approx(std, rel=1e-5)
    assert float((raw * reloaded.config.scaling_factor).std()) == pytest.approx(1.0, rel=1e-5)

    manifest = read_manifest(str(export), stage="autoencoder")
    assert manifest.models["vae"]["latent_channels"] == 4 and manifest.models["vae"]["downsample"] == 2
    assert manifest.models["vae"]["scaling_factor"] == pytest.approx(scale)
    vae = load_vae(VaeSpec(type="autoencoder_kl", id=str(export)))  # precompute's loader
    assert (vae.scaling_factor, vae.latent_channels, vae.downsample) == (pytest.approx(scale), 4, 2)
