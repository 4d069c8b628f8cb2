"""Conditions into the UNet: diffusers `UNet2DConditionModel`'s class embedding, and condition dropout.

- One class condition: `num_class_embeds = len(labels) + 1` (an `nn.Embedding`, the null id is
  its last row), `class_labels` = the ids (B,) long. This is the layout of SD's x4 upscaler.
- Scalars, or several conditions: `class_embed_type="projection"` (a `TimestepEmbedding` MLP)
  over a feature vector (B, F): a class contributes a one-hot of len(labels) + 1 (null included),
  a scalar a null flag plus a sinusoidal embedding of its value normalised to [0, 1] by the
  recorded range (the timestep embedding's frequencies, so nearby values embed alike).
Either way the embedding is added to the time embedding, as the model family's design says.
"""

from __future__ import annotations

from typing import Any

import torch

from latentforge.conditioning.spec import ConditionSet, ConditionSpec

SCALAR_FREQUENCIES = 16
"""Width of a scalar's sinusoidal embedding (plus one null flag)."""
SCALAR_SCALE = 1000.0
"""The normalised value is spread over [0, 1000] like a DDPM timestep before the sinusoids."""
CLASS_KEYS = ("class_embed_type", "num_class_embeds", "projection_class_embeddings_input_dim")


def single_class(conditions: ConditionSet) -> bool:
    return len(conditions.specs) == 1 and conditions.specs[0].kind == "class"


def feature_width(conditions: ConditionSet) -> int:
    return sum(s.null_id + 1 if s.kind == "class" else SCALAR_FREQUENCIES + 1 for s in conditions.specs)


def unet_class_config(conditions: ConditionSet) -> dict[str, Any]:
    """The `UNet2DConditionModel` config entries that give it this class embedding ({} without conditions)."""
    if not conditions:
        return {}
    if single_class(conditions):
        return {"num_class_embeds": conditions.specs[0].null_id + 1}
    return {"class_embed_type": "projection", "projection_class_embeddings_input_dim": feature_width(conditions)}


def class_labels(conditions: ConditionSet, rows: torch.Tensor) -> torch.Tensor | None:
    """Condition rows (B, N) -> the UNet's `class_labels`: ids (B,) long or features (B, F) float32."""
    if not conditions:
        return None
    if single_class(conditions):
        return rows[:, 0].round().long()
    parts = [_features(spec, rows[:, i]) for i, spec in enumerate(conditions.specs)]
    return torch.cat(parts, dim=1)


def _features(spec: ConditionSpec, column: torch.Tensor) -> torch.Tensor:
    if spec.kind == "class":
        return torch.nn.functional.one_hot(column.round().long(), spec.null_id + 1).float()  # (B, K+1)
    from diffusers.models.embeddings import get_timestep_embedding

    null = torch.isnan(column)
    span = (spec.maximum - spec.minimum) or 1.0  # type: ignore[operator]
    unit = ((torch.nan_to_num(column) - spec.minimum) / span).clamp(0, 1)
    waves = get_timestep_embedding(unit * SCALAR_SCALE, SCALAR_FREQUENCIES)  # (B, F)
    waves = torch.where(null[:, None], torch.zeros_like(waves), waves)
    return torch.cat([null[:, None].float(), waves], dim=1)


def condition_dropout(conditions: ConditionSet, rows: torch.Tensor, p: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace all conditions of a random fraction p of the batch by the null condition.

    rows (B, N); its own draw from `generator`, so it is independent of caption dropout.
    Returns the new rows and the (B,) bool dropped flags.
    """
    dropped = torch.rand((rows.shape[0],), generator=generator, device=generator.device) < p
    null = torch.tensor(conditions.null_row(), dtype=rows.dtype, device=rows.device)
    where = dropped.to(rows.device)[:, None]
    return torch.where(where, null[None], rows), dropped


def with_conditions(unet_config: dict[str, Any], conditions: ConditionSet) -> dict[str, Any]:
    """`unet_config` plus the class embedding the conditions need; a config that already has a class
    embedding of its own cannot take them (UNetConfigError)."""
    from latentforge.models.unet import UNetConfigError

    entries = unet_class_config(conditions)
    clashing = [k for k in CLASS_KEYS if entries and unet_config.get(k) is not None]
    if clashing:
        raise UNetConfigError(f"the UNet config sets {clashing} itself; the data's conditions {conditions.names} "
                              "need the class embedding (use a config without one)")
    return {**unet_config, **entries}


__all__ = ["unet_class_config", "class_labels", "condition_dropout", "feature_width", "with_conditions",
           "SCALAR_FREQUENCIES"]
