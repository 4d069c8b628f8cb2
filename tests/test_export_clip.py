"""open_clip text tower -> transformers CLIPTextModel + CLIPTokenizer: same ids, same states."""

from __future__ import annotations

import pytest
import torch

from latentforge.conversion.clip_convert import ConversionError, save_text_encoder
from latentforge.models.text_encoder import TINY_CLIP_NAME, save_tiny_clip_checkpoint
from latentforge.models.text_encoder import load_text_encoder

EDGE_CAPTIONS = ["", "a red circle!", "Wow!! really?!", " ".join(["word"] * 120), "Café  naïve ÉTÉ 東京 🙂",
                 "tabs\tand\nnewlines   everywhere", "x" * 400]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return save_tiny_clip_checkpoint(tmp_path_factory.mktemp("clip") / "tiny.safetensors")


def _converted(clip_path: str, layer: str, root) -> tuple:
    from transformers import CLIPTextModel, CLIPTokenizer

    encoder = load_text_encoder(TINY_CLIP_NAME, clip_path, layer)
    save_text_encoder(encoder, str(root / "text_encoder"), str(root / "tokenizer"))
    model = CLIPTextModel.from_pretrained(str(root / "text_encoder"), use_safetensors=True).eval()
    return encoder, model, CLIPTokenizer.from_pretrained(str(root / "tokenizer"))


def _ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """What StableDiffusionPipeline.encode_prompt asks the tokenizer for."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_hidden_states_equal_open_clip(clip_path, layer, tmp_path) -> None:
    encoder, model, tokenizer = _converted(clip_path, layer, tmp_path)
    assert model.config.num_hidden_layers == (2 if layer == "last" else 1)
    assert model.config.hidden_act == "gelu"  # lf-tiny-clip uses nn.GELU, not quick_gelu
    states, _, _ = encoder.encode(EDGE_CAPTIONS)
    with torch.no_grad():
        theirs = model(_ids(tokenizer, EDGE_CAPTIONS))[0]  # what the pipeline feeds the UNet
    assert theirs.shape == states.shape == (len(EDGE_CAPTIONS), 77, 32)
    torch.testing.assert_close(theirs, states, rtol=0, atol=1e-5)


def test_layers_differ_so_the_layer_choice_is_tested(clip_path) -> None:
    last = load_text_encoder(TINY_CLIP_NAME, clip_path, "last").encode(["a cat"])[0]
    penultimate = load_text_encoder(TINY_CLIP_NAME, clip_path, "penultimate").encode(["a cat"])[0]
    assert (last - penultimate).abs().max() > 1e-2


def test_token_ids_equal_open_clip_on_edge_captions(clip_path, tmp_path) -> None:
    encoder, _, tokenizer = _converted(clip_path, "last", tmp_path)
    ids = _ids(tokenizer, EDGE_CAPTIONS)
    assert torch.equal(ids, encoder.tokenize(EDGE_CAPTIONS))
    assert ids[3, -1].item() == 49407 and ids[0, 2:].eq(0).all()  # truncated row ends in EOT; pad is 0


def test_token_ids_equal_open_clip_on_laion_captions(clip_path, tmp_path, laion_sample) -> None:
    """All 10k real captions. open_clip runs ftfy and html.unescape before BPE, which a tokenizers
    normalizer cannot do: those captions match once the caller cleans them the same way (docs/export.md)."""
    import pandas as pd
    from open_clip.tokenizer import basic_clean

    encoder, _, tokenizer = _converted(clip_path, "last", tmp_path)
    captions = [str(c) if c is not None else "" for c in pd.read_parquet(laion_sample)["TEXT"]]
    prepared = [basic_clean(c) for c in captions]
    escaped = [p != c.strip() for p, c in zip(prepared, captions)]
    ours = encoder.tokenize(captions)
    assert torch.equal(_ids(tokenizer, prepared), ours)
    raw_equal = (_ids(tokenizer, captions) == ours).all(dim=1)
    assert not bool(raw_equal[[i for i, e in enumerate(escaped) if not e]].logical_not().any())
    assert sum(escaped) < len(captions) // 100


def test_quick_gelu_tower_maps_to_quick_gelu(tmp_path) -> None:
    import open_clip

    from latentforge.conversion.clip_convert import clip_text_config
    from latentforge.models.text_encoder import TextEncoder, register_package_configs

    register_package_configs()
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None, force_quick_gelu=True).eval()
    encoder = TextEncoder(TINY_CLIP_NAME, None, "last", model, open_clip.get_tokenizer(TINY_CLIP_NAME),
                          torch.device("cpu"), torch.float32)
    assert clip_text_config(encoder).hidden_act == "quick_gelu"
    model.transformer.resblocks[0].ls_1 = torch.nn.Linear(32, 32)  # a layer scale CLIPTextModel cannot hold
    with pytest.raises(ConversionError, match="ls_1"):
        clip_text_config(encoder)
