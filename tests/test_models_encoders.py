"""Encoders load through the user code path and equal the libraries' own forward passes."""

from __future__ import annotations

import pytest
import torch

from latentforge.models.text_encoder import TINY_CLIP_NAME, save_tiny_clip_checkpoint
from tests.harness.tiny_models import save_tiny_autoencoder_kl, save_tiny_autoencoder_tiny
from latentforge.models.text_encoder import load_text_encoder, load_text_encoder_from_manifest
from latentforge.models.vae import VaeSpec, load_vae, load_vae_from_manifest, split_hub_id


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "kl": save_tiny_autoencoder_kl(root / "kl"),
        "tiny": save_tiny_autoencoder_tiny(root / "tiny"),
        "clip": save_tiny_clip_checkpoint(root / "clip.safetensors"),
    }


def _pixels(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_autoencoder_kl_equals_diffusers(tiny_models) -> None:
    from diffusers import AutoencoderKL

    vae = load_vae(VaeSpec("autoencoder_kl", tiny_models["kl"]))
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels, vae.downsample) == (0.5, 0.1, 4, 2)
    direct = AutoencoderKL.from_pretrained(tiny_models["kl"]).eval()
    x = _pixels()
    with torch.no_grad():
        dist = direct.encode(x).latent_dist
    torch.testing.assert_close(vae.encode(x), (dist.mean - 0.1) * 0.5)
    mean, std = vae.encode_posterior(x)
    torch.testing.assert_close(std, dist.std)
    # sample: mean + std * eps from the generator, scaled once
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    eps = torch.randn(mean.shape, generator=g2)
    torch.testing.assert_close(vae.encode(x, "sample", g1), (mean + std * eps - 0.1) * 0.5)
    # decode inverts the scaling before the diffusers decoder
    z = vae.encode(x)
    with torch.no_grad():
        expected = direct.decode(z / 0.5 + 0.1).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(z), expected)


def test_autoencoder_tiny_equals_diffusers(tiny_models) -> None:
    from diffusers import AutoencoderTiny

    vae = load_vae(VaeSpec("autoencoder_tiny", tiny_models["tiny"]))
    direct = AutoencoderTiny.from_pretrained(tiny_models["tiny"]).eval()
    x = _pixels(1)
    with torch.no_grad():
        expected = direct.encode(x).latents * direct.config.scaling_factor
    torch.testing.assert_close(vae.encode(x), expected)
    assert vae.decode(vae.encode(x)).shape == x.shape


def test_patchify_is_lossless() -> None:
    vae = load_vae(VaeSpec("patchify", patch_size=4))
    x = _pixels(2)
    z = vae.encode(x)
    assert z.shape == (3, 48, 8, 8) and vae.latent_channels == 48 and vae.downsample == 4
    torch.testing.assert_close(vae.decode(z), x)


def test_vae_from_manifest_refuses_changed_factors(tiny_models) -> None:
    vae = load_vae(VaeSpec("autoencoder_kl", tiny_models["kl"]))
    record = {"models": {"vae": vae.describe()}}
    assert load_vae_from_manifest(record).scaling_factor == 0.5
    record["models"]["vae"]["scaling_factor"] = 0.18215
    with pytest.raises(ValueError, match="scaling_factor"):
        load_vae_from_manifest(record)


def test_bad_specs() -> None:
    with pytest.raises(ValueError):
        VaeSpec("vqgan", "x")
    with pytest.raises(ValueError):
        VaeSpec("autoencoder_kl")
    assert split_hub_id("stabilityai/stable-diffusion-2-1-base/vae") == ("stabilityai/stable-diffusion-2-1-base", "vae")
    assert split_hub_id("stabilityai/sd-vae-ft-mse") == ("stabilityai/sd-vae-ft-mse", None)


def _direct_clip_states(model, tokens, layer: str) -> torch.Tensor:
    """open_clip's CLIP text forward written out: embeddings -> resblocks(causal mask) -> ln_final."""
    x = model.token_embedding(tokens) + model.positional_embedding
    blocks = model.transformer.resblocks
    for block in (blocks if layer == "last" else blocks[:-1]):
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_text_states_equal_open_clip_forward(tiny_models, layer: str) -> None:
    import open_clip

    captions = ["a photo of a cat!", "", "Ünïcødé &amp; a very " + "long " * 100 + "caption"]
    encoder = load_text_encoder(TINY_CLIP_NAME, tiny_models["clip"], layer)
    states, lengths, pooled = encoder.encode(captions)

    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=tiny_models["clip"], weights_only=True).eval()
    tokens = open_clip.get_tokenizer(TINY_CLIP_NAME)(captions)
    with torch.no_grad():
        expected = _direct_clip_states(model, tokens, layer)
        expected_pooled = model.encode_text(tokens)
    eot = open_clip.get_tokenizer(TINY_CLIP_NAME).eot_token_id
    assert lengths.tolist() == [int((row == eot).nonzero()[0]) + 1 for row in tokens]
    assert lengths[1] == 2 and lengths[2] == 77
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(states[i, :n], expected[i, :n])
    # A fused kernel path vs a direct forward: equal to float32 rounding, not bit-equal (CPUs differ).
    torch.testing.assert_close(pooled, expected_pooled)
    assert encoder.describe() == {"name": TINY_CLIP_NAME, "weights": tiny_models["clip"], "layer": layer,
                                  "context_length": 77, "width": 32, "pooled_dim": 32}
    again = load_text_encoder_from_manifest({"models": {"text_encoder": encoder.describe()}})
    torch.testing.assert_close(again.encode(captions)[2], pooled)


def test_text_states_do_not_depend_on_batch_padding(tiny_models) -> None:
    encoder = load_text_encoder(TINY_CLIP_NAME, tiny_models["clip"])
    alone, n, _ = encoder.encode(["short"])
    batched, _, _ = encoder.encode(["short", "a much longer caption " * 5])
    torch.testing.assert_close(alone[0, : n[0]], batched[0, : n[0]])


def test_missing_checkpoint_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_text_encoder(TINY_CLIP_NAME, str(tmp_path / "nope.safetensors"))
