"""On-disk sample formats shared by the stages (WebDataset tar members).

Ingest shard  `NNNNN.tar`:  `{key}.jpg|png|webp` (RGB), `{key}.txt` (caption), `{key}.json` (metadata)
Latent shard  `NNNNN.tar`:  `{key}.latent.npy`, `{key}.text.npy`, `{key}.pooled.npy`, `{key}.txt`, `{key}.json`
                            (+ `{key}.pixels.npy` with --store-pixels)

Keys are `{shard:05d}{index:04d}` and survive every stage unchanged, so a latent can always be
traced back to its ingest ledger row. Arrays are `.npy` (never pickles). numpy has no bfloat16,
so bf16 tensors are stored as their raw uint16 bits and the manifest's `dtype` says how to
view them.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are used: the ingest driver never needs it (1 s import)
    import torch

SHARD_DIGITS = 5
INDEX_DIGITS = 4
MAX_SAMPLES_PER_SHARD = 10 ** INDEX_DIGITS
IMAGE_EXTENSIONS = ("jpg", "png", "webp")
PIXELS_MEMBER = "pixels.npy"
"""Latent-shard member of the preprocessed image (uint8 R x R x 3), written with precompute --store-pixels."""

# Storage dtype name -> torch attribute name (torch itself is imported only where tensors are used).
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
STORAGE_DTYPES = tuple(TORCH_DTYPE_NAMES)


def shard_name(shard: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}"


def sample_key(shard: int, index: int) -> str:
    """Key of the `index`-th row of shard `shard`; fixed by the input order, never by timing."""
    if not 0 <= index < MAX_SAMPLES_PER_SHARD:
        raise ValueError(f"index {index} does not fit a {INDEX_DIGITS}-digit key")
    return f"{shard:0{SHARD_DIGITS}d}{index:0{INDEX_DIGITS}d}"


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a storage dtype name (`fp32`, `fp16`, `bf16`)."""
    import torch

    if name not in STORAGE_DTYPES:
        raise KeyError(f"unknown dtype {name!r}; expected one of {', '.join(STORAGE_DTYPES)}")
    return getattr(torch, TORCH_DTYPE_NAMES[name])


def tensor_to_storage(tensor: "torch.Tensor", dtype: str) -> np.ndarray:
    """Cast to the stored dtype and return a numpy array (bf16 as uint16 bits)."""
    import torch

    cast = tensor.detach().to("cpu", torch_dtype(dtype)).contiguous()
    return cast.view(torch.uint16).numpy() if dtype == "bf16" else cast.numpy()


def storage_to_tensor(array: np.ndarray, dtype: str) -> "torch.Tensor":
    """Inverse of `tensor_to_storage`; returns the tensor in its stored dtype."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bf16" else tensor


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8")


def decode_json(data: bytes) -> dict[str, Any]:
    return json.loads(data.decode("utf-8"))
