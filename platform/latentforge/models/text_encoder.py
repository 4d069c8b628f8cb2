"""open_clip text towers: per-token states from a chosen layer and the model's pooled embedding.

``load_text_encoder(name, weights, layer)`` builds the model with ``open_clip.create_model``
(``weights`` = a pretrained tag such as ``laion2b_s32b_b79k`` or a local checkpoint file;
safetensors preferred, other files are read with ``torch.load(weights_only=True)``, never
unpickled) and uses ``open_clip.get_tokenizer``.

Layers:
- ``last``        the output of ``ln_final`` over the whole sequence (what ``encode_text`` pools from).
- ``penultimate`` the output of the second-to-last residual block, then ``ln_final`` (SD 2.x's
                  ``FrozenOpenCLIPEmbedder(layer="penultimate")``).

Both are captured with forward hooks during ONE call of the model's own ``encode_text``, so the
pooled embedding is exactly ``encode_text``'s and the states use the model's own attention mask
(causal for CLIP text towers: a real token never attends to padding, so the rows up to the
end-of-text token do not depend on the padding after it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from latentforge.models.vae import require_local_model

TINY_CLIP_NAME = "lf-tiny-clip"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
LAYERS = ("last", "penultimate")


def open_clip_module() -> Any:
    """``open_clip``, imported without letting timm import wandb.

    open_clip imports timm, and timm imports wandb whenever it is installed (img2dataset depends
    on it). wandb makes two temp dirs at import (tmp*wandb-media, tmp*wandb-artifacts) that only
    a clean interpreter exit removes, which Ray workers never reach: every process that loaded a
    text encoder left them behind. LatentForge never uses wandb; timm treats an ImportError as
    "not installed", so wandb is hidden for the duration of this one import.
    """
    if "open_clip" not in sys.modules and "wandb" not in sys.modules:
        sys.modules["wandb"] = None  # type: ignore[assignment]  # `import wandb` raises ImportError
        try:
            import open_clip  # noqa: F401
        finally:
            del sys.modules["wandb"]
    import open_clip

    return open_clip


def register_package_configs() -> None:
    """Make the open_clip configs shipped in ``latentforge/models/configs`` known to open_clip."""
    open_clip = open_clip_module()

    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def _text_tower(model: Any) -> Any:
    """The module holding token_embedding/transformer/ln_final (CLIP itself, or CustomTextCLIP.text)."""
    if hasattr(model, "transformer") and hasattr(model, "ln_final") and hasattr(model, "token_embedding"):
        return model
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "ln_final"):
        return text
    raise ValueError(f"{type(model).__name__}: only open_clip CLIP text transformers are supported "
                     "(HF text towers are not)")


class TextEncoder:
    """A loaded open_clip text tower. ``encode(captions) -> (states, lengths, pooled)``."""

    def __init__(self, name: str, weights: str | None, layer: str, model: Any, tokenizer: Any,
                 device: torch.device, dtype: torch.dtype) -> None:
        if layer not in LAYERS:
            raise ValueError(f"unknown text layer {layer!r}; expected one of {list(LAYERS)}")
        self.name = name
        self.weights = weights
        self.layer = layer
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.tower = _text_tower(model)
        self.context_length = int(getattr(tokenizer, "context_length", None) or self.tower.positional_embedding.shape[0])
        self.width = int(self.tower.transformer.width)
        self.eot_token_id = getattr(tokenizer, "eot_token_id", None)
        with torch.no_grad():
            probe = self.model.encode_text(self.tokenize([""]))
        self.pooled_dim = int(probe.shape[-1])

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions)).to(self.device)

    def lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Real tokens per row: start, text and end-of-text, i.e. up to and including EOT."""
        if self.eot_token_id is not None:
            is_eot = tokens == self.eot_token_id
            first = is_eot.int().argmax(dim=-1)
            return torch.where(is_eot.any(dim=-1), first + 1, torch.full_like(first, tokens.shape[-1])).long()
        return (tokens.argmax(dim=-1) + 1).long()  # CLIP BPE: EOT is the highest id

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states (B, context_length, width), lengths (B,), pooled (B, pooled_dim)).

        ``states[i, lengths[i]:]`` are padding positions and must not be used.
        """
        tokens = self.tokenize(captions)
        captured: dict[str, torch.Tensor] = {}
        transformer = self.tower.transformer
        batch_first = getattr(transformer, "batch_first", True)

        def keep(name: str):
            def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
                captured[name] = output
            return hook

        if self.layer == "last":
            handle = self.tower.ln_final.register_forward_hook(keep("states"))
        else:
            handle = transformer.resblocks[-2].register_forward_hook(keep("block"))
        try:
            pooled = self.model.encode_text(tokens)
        finally:
            handle.remove()
        if self.layer == "last":
            states = captured["states"]
        else:
            block = captured["block"]
            if not batch_first:
                block = block.transpose(0, 1)
            states = self.tower.ln_final(block)
        if states.dim() != 3 or states.shape[1] != tokens.shape[1]:
            raise RuntimeError(f"unexpected text state shape {tuple(states.shape)} for tokens {tuple(tokens.shape)}")
        return states, self.lengths(tokens), pooled

    def describe(self) -> dict[str, Any]:
        """The manifest's ``models.text_encoder`` record."""
        return {
            "name": self.name,
            "weights": self.weights,
            "layer": self.layer,
            "context_length": self.context_length,
            "width": self.width,
            "pooled_dim": self.pooled_dim,
        }


def _is_file(weights: str | None) -> bool:
    return bool(weights) and (os.path.sep in weights or os.path.exists(weights) or
                              weights.endswith((".safetensors", ".pt", ".pth", ".bin")))


def load_text_encoder(name: str, weights: str | None, layer: str = "last", device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Build open_clip model ``name`` with ``weights`` (pretrained tag, checkpoint file or None = random)."""
    open_clip = open_clip_module()

    if layer not in LAYERS:
        raise ValueError(f"unknown text layer {layer!r}; expected one of {list(LAYERS)}")
    register_package_configs()
    device = torch.device(device)
    source = weights or None
    if _is_file(weights):
        require_local_model(weights, "text encoder checkpoint")
        source = os.path.abspath(weights)
    # open_clip's own loader: safetensors by suffix, anything else with torch.load(weights_only=True).
    model = open_clip.create_model(name, pretrained=source, device="cpu",
                                   require_pretrained=source is not None, weights_only=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    return TextEncoder(name, weights, layer, model, tokenizer, device, dtype)


def load_text_encoder_from_manifest(manifest: Any, device: str | torch.device = "cpu",
                                    dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Load the text encoder a precompute manifest recorded in ``models.text_encoder``."""
    models = manifest["models"] if isinstance(manifest, Mapping) else manifest.models
    record = models["text_encoder"]
    return load_text_encoder(record["name"], record.get("weights"), record.get("layer", "last"),
                             device=device, dtype=dtype)


def save_tiny_clip_checkpoint(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a randomly initialised ``lf-tiny-clip`` as a .safetensors file; returns its path."""
    open_clip = open_clip_module()
    from safetensors.torch import save_file

    register_package_configs()
    path = str(path)
    if not path.endswith(".safetensors"):
        path = os.path.join(path, f"{TINY_CLIP_NAME}.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None, device="cpu")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, path)
    return path
