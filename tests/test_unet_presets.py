"""UNet presets: `tiny-pooled` adds the attention-pooled caption to the time embedding of `tiny`."""

from __future__ import annotations

import pytest
import torch

from latentforge.models.unet import UNetConfigError, build_unet, resolve_unet_config

WIDTH = 32  # lf-tiny-clip's text width, as in the demo


def _time_embedding(unet, text: torch.Tensor) -> torch.Tensor:
    """The embedding every ResNet block receives for timestep 500 and these (B, L, D) text states."""
    emb = unet.time_embedding(unet.time_proj(torch.tensor([500] * text.shape[0])))  # (B, E)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs={})
    return emb if aug is None else emb + aug


def test_tiny_pooled_adapts_to_the_data_and_differs_from_tiny_only_in_the_text_embedding():
    pooled = resolve_unet_config("tiny-pooled", 4, WIDTH, 8)
    tiny = resolve_unet_config("tiny", 4, WIDTH, 8)
    assert (pooled["in_channels"], pooled["out_channels"], pooled["cross_attention_dim"]) == (4, 4, WIDTH)
    extra = {k: v for k, v in pooled.items() if tiny.get(k) != v}
    assert extra == {"addition_embed_type": "text", "addition_embed_type_num_heads": 4}


def test_tiny_pooled_puts_the_caption_into_the_time_embedding():
    torch.manual_seed(0)
    texts = torch.randn(2, 77, WIDTH)  # (B, L, D) two different captions
    same_caption = texts[:1].expand(2, -1, -1)
    with torch.no_grad():
        pooled = _time_embedding(build_unet("tiny-pooled", 4, WIDTH, 8), texts)
        tiny = _time_embedding(build_unet("tiny", 4, WIDTH, 8), texts)
        pooled_same = _time_embedding(build_unet("tiny-pooled", 4, WIDTH, 8), same_caption)
    assert torch.allclose(tiny[0], tiny[1])  # tiny: the time embedding knows only the timestep
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3
    assert torch.allclose(pooled_same[0], pooled_same[1], atol=1e-6)


def test_tiny_pooled_saves_and_reloads_with_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = build_unet("tiny-pooled", 4, WIDTH, 8).eval()
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, WIDTH)  # (B, C, h, w), (B, L, D)
    with torch.no_grad():
        expected = unet(x, 10, encoder_hidden_states=text).sample
        got = loaded(x, 10, encoder_hidden_states=text).sample
    assert torch.allclose(expected, got, atol=1e-6)


def test_tiny_pooled_refuses_a_text_width_its_pooling_heads_do_not_divide():
    with pytest.raises(UNetConfigError, match="30 wide, which its 4 text-pooling heads"):
        resolve_unet_config("tiny-pooled", 4, 30, 8)
