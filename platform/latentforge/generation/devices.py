"""Device / dtype names from configs."""

from __future__ import annotations

import torch

from latentforge.formats import torch_dtype


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name: str) -> torch.dtype:
    return torch_dtype(name)
