"""CLIP score: the formula pinned on fixed embeddings, and the open_clip scorer end to end."""

from __future__ import annotations

import math

import pytest
import torch

from latentforge.evaluation.clip_score import FORMULA, ClipScorer, clip_score_from_embeddings


def _pair_with_cos(c: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([1.0, 0.0], dtype=torch.float64),
            torch.tensor([c, math.sqrt(1 - c * c)], dtype=torch.float64) * 3.0)  # scale must not matter


def test_clip_score_pinned_on_fixed_embeddings() -> None:
    (a1, b1), (a2, b2) = _pair_with_cos(-0.1), _pair_with_cos(0.3)
    score = clip_score_from_embeddings(torch.stack([a1, a2]), torch.stack([b1, b2]))
    assert score == pytest.approx(15.0, abs=1e-9)  # mean(100*max(-0.1,0), 100*0.3)
    assert "max(cos" in FORMULA
    with pytest.raises(ValueError):
        clip_score_from_embeddings(torch.zeros(2, 3), torch.zeros(3, 3))


def test_clip_scorer_with_tiny_open_clip(tmp_path) -> None:
    from latentforge.models.text_encoder import TINY_CLIP_NAME, save_tiny_clip_checkpoint

    ckpt = save_tiny_clip_checkpoint(tmp_path / "clip.safetensors", seed=1)
    scorer = ClipScorer(TINY_CLIP_NAME, ckpt)
    images = torch.rand(3, 3, 40, 40) * 2 - 1
    out = scorer.score(images, ["a red circle", "a blue square", "a cat"], batch_size=2)
    assert 0.0 <= out["clip_score"] <= 100.0 and out["clip_n"] == 3
    assert out["clip_model"].startswith(f"open_clip:{TINY_CLIP_NAME}:clip.safetensors@sha256:")
    assert out["clip_score_formula"] == FORMULA
    again = scorer.score(images, ["a red circle", "a blue square", "a cat"])
    assert again["clip_score"] == pytest.approx(out["clip_score"], abs=1e-4)  # float32 model, other batching
