"""open_clip text tower -> transformers ``CLIPTextModel`` + ``CLIPTokenizer`` files.

The same conversion Stable Diffusion 2 used (diffusers' ``convert_open_clip_checkpoint``):
``transformer.resblocks.N`` become ``text_model.encoder.layers.N``, ``attn.in_proj_*`` is split
into q/k/v, ``ln_final`` becomes ``final_layer_norm``. ``layer="penultimate"`` keeps every block
but the last and still applies ``final_layer_norm`` — what ``FrozenOpenCLIPEmbedder(layer=
"penultimate")`` fed SD 2's UNet — so the diffusers pipeline's ``text_encoder(ids)[0]`` is the
state training used, without ``clip_skip``.

Tokenizer files are written from open_clip's own BPE vocabulary (``SimpleTokenizer``): the same
ids, start/end-of-text 49406/49407, and pad "!" (id 0) because open_clip pads with zeros.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from latentforge.models.text_encoder import TextEncoder

# open_clip per-block names -> CLIPEncoderLayer names; in_proj is split separately.
BLOCK_KEYS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
# open_clip pads rows with id 0, which is the BPE piece "!". Naming "!" the pad token (as SD 2's
# tokenizer did) makes it a special token, so a "!" in a prompt no longer goes through BPE; an alias
# of id 0 that no caption contains keeps "!" ordinary.
PAD_TOKEN = "<|lf_pad|>"


class ConversionError(ValueError):
    """The text tower has parts CLIPTextModel cannot hold."""


def _activation(tower: Any) -> str:
    """hidden_act of the tower's MLP: open_clip builds ``QuickGELU`` or ``nn.GELU``."""
    act = tower.transformer.resblocks[0].mlp[1]
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ConversionError(f"text tower activation {name} has no transformers CLIP equivalent")


def _check_plain_blocks(tower: Any) -> None:
    """Refuse open_clip options CLIPEncoderLayer has no place for (layer scale, extra norms)."""
    block = tower.transformer.resblocks[0]
    for part in ("ls_1", "ls_2", "ln_attn"):
        module = getattr(block, part, None)
        if module is not None and not isinstance(module, torch.nn.Identity):
            raise ConversionError(f"text tower blocks use {part}; CLIPTextModel cannot hold it")
    if getattr(tower, "text_pool_type", "argmax") != "argmax" or getattr(tower, "attn_mask", None) is None:
        raise ConversionError("text tower is not a causal, argmax-pooled CLIP text transformer")


def clip_text_config(encoder: TextEncoder) -> Any:
    """The ``CLIPTextConfig`` for ``encoder``'s tower at its layer."""
    from transformers import CLIPTextConfig

    tower = encoder.tower
    _check_plain_blocks(tower)
    blocks = tower.transformer.resblocks
    keep = len(blocks) - (1 if encoder.layer == "penultimate" else 0)
    return CLIPTextConfig(
        vocab_size=int(tower.token_embedding.weight.shape[0]),
        hidden_size=encoder.width,
        intermediate_size=int(blocks[0].mlp.c_fc.weight.shape[0]),
        projection_dim=encoder.pooled_dim,
        num_hidden_layers=keep,
        num_attention_heads=int(blocks[0].attn.num_heads),
        max_position_embeddings=int(tower.positional_embedding.shape[0]),
        hidden_act=_activation(tower),
        layer_norm_eps=float(tower.ln_final.eps),
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )


def convert_state_dict(encoder: TextEncoder, num_layers: int) -> dict[str, torch.Tensor]:
    """open_clip text state -> ``CLIPTextModel`` state (first ``num_layers`` blocks)."""
    tower = encoder.tower
    src = {k: v.detach().float().cpu() for k, v in tower.state_dict().items()}
    out = {
        "text_model.embeddings.token_embedding.weight": src["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": src["positional_embedding"],
        "text_model.final_layer_norm.weight": src["ln_final.weight"],
        "text_model.final_layer_norm.bias": src["ln_final.bias"],
    }
    for i in range(num_layers):
        ours, theirs = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for old, new in BLOCK_KEYS.items():
            for kind in ("weight", "bias"):
                out[f"{theirs}{new}.{kind}"] = src[f"{ours}{old}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = src[f"{ours}attn.in_proj_{kind}"].chunk(3, dim=0)
            for name, part in zip("qkv", (q, k, v)):
                out[f"{theirs}self_attn.{name}_proj.{kind}"] = part.contiguous()
    return out


def to_clip_text_model(encoder: TextEncoder) -> Any:
    """A ``CLIPTextModel`` (float32, eval) whose ``[0]`` equals ``encoder.encode``'s states."""
    from transformers import CLIPTextModel

    config = clip_text_config(encoder)
    model = CLIPTextModel(config)
    state = convert_state_dict(encoder, config.num_hidden_layers)
    if not any(key.startswith("text_model.") for key in model.state_dict()):
        # transformers 5 names CLIPTextModel's parameters without the text_model. prefix
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConversionError(f"conversion left keys unmatched: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


def _simple_tokenizer(encoder: TextEncoder) -> Any:
    """open_clip's BPE tokenizer behind ``encoder`` (its tokenizer or the default vocabulary)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = encoder.tokenizer
    if not isinstance(tok, SimpleTokenizer):
        raise ConversionError(f"text tokenizer {type(tok).__name__} is not open_clip's BPE SimpleTokenizer")
    return tok


def write_tokenizer_files(encoder: TextEncoder, directory: str) -> None:
    """vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json for ``CLIPTokenizer``."""
    tok = _simple_tokenizer(encoder)
    os.makedirs(directory, exist_ok=True)
    vocab = {HF_SPECIAL.get(piece, piece): idx for piece, idx in tok.encoder.items()}
    vocab[PAD_TOKEN] = 0
    merges = [" ".join(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda item: item[1])]
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": PAD_TOKEN}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
                                             "model_max_length": int(tok.context_length), **specials}, indent=2),
    }
    for name, text in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
            handle.write(text)


def save_text_encoder(encoder: TextEncoder, text_encoder_dir: str, tokenizer_dir: str) -> Any:
    """Write ``text_encoder/`` (safetensors) and ``tokenizer/``; returns the converted model."""
    model = to_clip_text_model(encoder)
    model.save_pretrained(text_encoder_dir, safe_serialization=True)
    write_tokenizer_files(encoder, tokenizer_dir)
    return model
