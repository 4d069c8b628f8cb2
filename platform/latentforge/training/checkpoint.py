"""Training checkpoints as safetensors + JSON only; the loader never unpickles anything.

A checkpoint is a directory of named *parts*. Each part is a nested Python structure (a state
dict: dicts, lists, tuples, numbers, strings, tensors) stored as two files:

    PART.safetensors   every tensor of the structure, keyed by its path ("state.3.exp_avg")
    PART.json          the structure with each tensor replaced by {"__tensor__": "<path>"}

Parts written by the train loop: `model` (raw UNet weights), `ema` (diffusers EMAModel state),
`optimizer` (AdamW state), `trainer` (step, epoch, data position, LR scheduler, counters,
MLflow run id, config) and one `rng_rank{R}` per worker (torch/CUDA/numpy/python RNG states and
the training generator). `read_part` refuses the whole directory if it holds anything other
than .safetensors / .json files, and safetensors' own parser rejects a pickle dressed up with
a .safetensors name, so a tampered checkpoint fails loudly before any code could run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

ALLOWED_SUFFIXES = (".safetensors", ".json")
FORMAT_VERSION = 1
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; torch.save's zip container


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, tampered with or holds a forbidden (pickle) payload."""


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able structure, {path: tensor}) for a nested state."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, (str, int))]
            if bad:
                raise CheckpointError(f"{path or '<root>'}: unsupported key types {bad}")
            return {"__dict__": [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"{path or '<root>'}: cannot store a {type(value).__name__} in a checkpoint")

    return walk(obj, prefix), tensors


def unflatten_state(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(structure, list):
        return [unflatten_state(v, tensors) for v in structure]
    if isinstance(structure, dict):
        if "__tensor__" in structure:
            key = structure["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"tensor {key!r} is missing from the checkpoint")
            return tensors[key]
        if "__tuple__" in structure:
            return tuple(unflatten_state(v, tensors) for v in structure["__tuple__"])
        if "__dict__" in structure:
            return {k: unflatten_state(v, tensors) for k, v in structure["__dict__"]}
        raise CheckpointError(f"unknown structure node {sorted(structure)}")
    return structure


def write_part(directory: str | Path, name: str, obj: Any) -> None:
    """Write PART.safetensors and PART.json into a local directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    structure, tensors = flatten_state(obj)
    # safetensors refuses tensors that share memory; clone only those.
    seen: dict[tuple[int, int], str] = {}
    for key, tensor in tensors.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else (id(tensor), 0)
        if ident in seen:
            tensors[key] = tensor.clone()
        seen[ident] = key
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "structure": structure}))


def check_checkpoint_dir(directory: str | Path) -> list[str]:
    """Refuse any file that is not .safetensors/.json, or whose bytes look like a pickle."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    names = []
    for root, _dirs, files in os.walk(directory):
        for fname in files:
            path = Path(root) / fname
            rel = str(path.relative_to(directory))
            if not fname.endswith(ALLOWED_SUFFIXES):
                raise CheckpointError(
                    f"checkpoint {directory} holds {rel!r}: only .safetensors and .json files are loaded "
                    "(pickle-based files such as .pt/.bin/.pkl are refused without being opened)")
            with open(path, "rb") as handle:
                head = handle.read(4)
            if head.startswith(_PICKLE_MAGIC):
                raise CheckpointError(f"checkpoint {directory}: {rel!r} is a pickle/torch.save payload, refused "
                                      "without loading it")
            names.append(rel)
    return names


def read_part(directory: str | Path, name: str, device: str | torch.device = "cpu") -> Any:
    """Load PART written by `write_part` (the directory is checked first)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    check_checkpoint_dir(directory)
    meta_path, tensor_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not meta_path.exists() or not tensor_path.exists():
        raise CheckpointError(f"checkpoint {directory} is incomplete: part {name!r} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{meta_path}: not JSON ({exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    try:
        tensors = load_file(str(tensor_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensor_path}: not a valid safetensors file ({exc})") from exc
    return unflatten_state(meta["structure"], tensors)


def has_part(directory: str | Path, name: str) -> bool:
    return (Path(directory) / f"{name}.json").exists()
