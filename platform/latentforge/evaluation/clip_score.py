"""CLIP score: mean over samples of 100 · max(cos(image_i, text_i), 0) with an open_clip model.

The number is only comparable between runs that used the same model and weights, so the model id
(name + pretrained tag or weights file with its sha256) and the formula travel with it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from latentforge import storage
from latentforge.pixels import to_uint8

FORMULA = "mean_i 100 * max(cos(image_emb_i, text_emb_i), 0)"


def clip_score_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """The score of paired embeddings (B, D) x (B, D); they need not be normalised."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"paired embeddings must both be (B, D), got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    a = image_emb.detach().to(torch.float64)
    b = text_emb.detach().to(torch.float64)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float((100.0 * cos.clamp(min=0)).mean())


class ClipScorer:
    """An open_clip model (name + pretrained tag or local checkpoint) that scores image/text pairs."""

    def __init__(self, model: str, weights: str | None = None, device: str | torch.device = "cpu") -> None:
        from latentforge.models.text_encoder import open_clip_module, register_package_configs

        open_clip = open_clip_module()
        register_package_configs()
        self.model_name = model
        self.weights = weights
        self.weights_sha256 = storage.sha256_file(weights) if weights and os.path.isfile(weights) else None
        self.device = torch.device(device)
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights, device=self.device)
        self.model = net.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model)

    @property
    def model_id(self) -> str:
        tag = self.weights or "random-init"
        if self.weights_sha256:
            tag = f"{os.path.basename(self.weights)}@sha256:{self.weights_sha256[:16]}"
        return f"open_clip:{self.model_name}:{tag}"

    def describe(self) -> dict[str, Any]:
        return {"clip_model": self.model_id, "clip_score_formula": FORMULA}

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 3, H, W) -> image embeddings, through the model's own preprocessing."""
        from PIL import Image

        u8 = to_uint8(images)
        pils = [Image.fromarray(x.permute(1, 2, 0).cpu().numpy()) for x in u8]
        batch = torch.stack([self.preprocess(p) for p in pils]).to(self.device)
        return self.model.encode_image(batch).float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens).float().cpu()

    def score(self, images: torch.Tensor, texts: Sequence[str], batch_size: int = 32) -> dict[str, Any]:
        img, txt = [], []
        for start in range(0, len(texts), batch_size):
            img.append(self.embed_images(images[start:start + batch_size]))
            txt.append(self.embed_texts(texts[start:start + batch_size]))
        value = clip_score_from_embeddings(torch.cat(img), torch.cat(txt))
        return {"clip_score": value, "clip_n": len(texts), **self.describe()}
