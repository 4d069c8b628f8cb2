"""Fidelity gate: re-encode a random sample of stored items in fp32, in one process, and compare.

The relative error of an array is ``max|stored - reference| / max|reference|``; the gate records
the largest over the sampled items (latents, text states over the real tokens, pooled) and fails
when it exceeds the tolerance. It catches a wrong scaling factor, a dtype overflow, a mixed-up
key/row, a preprocessing drift between workers, or a broken GPU kernel.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from latentforge import formats, storage
from latentforge.precompute.config import PrecomputeConfig
from latentforge.precompute.encode import PrecomputeEncoder
from latentforge.precompute.preprocess import preprocess_sample
from latentforge.precompute.shard_input import ShardRead, read_shard
from latentforge.tar_samples import iter_shard


def relative_error(stored: torch.Tensor, reference: torch.Tensor) -> float:
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    diff = float((stored.float() - reference.float()).abs().max()) if reference.numel() else 0.0
    return diff / max(scale, 1e-6)


def choose_items(output_dir: str, shard_names: list[str], n: int, seed: int) -> dict[str, list[str]]:
    """Up to ``n`` random keys, read from shards in a seeded random order: {shard: [keys]}."""
    rng = random.Random(seed)
    order = list(shard_names)
    rng.shuffle(order)
    chosen: dict[str, list[str]] = {}
    remaining = n
    for name in order:
        if remaining <= 0:
            break
        keys = [key for key, _ in iter_shard(storage.join(output_dir, f"{name}.tar"))]
        picked = sorted(rng.sample(keys, min(len(keys), remaining)))
        if picked:
            chosen[name] = picked
            remaining -= len(picked)
    return chosen


def check_fidelity(config: PrecomputeConfig, shard_names: list[str], device: str | None = None) -> dict[str, Any]:
    """Re-encode ``config.fidelity_samples`` stored items in fp32 and compare; the manifest record."""
    record: dict[str, Any] = {"samples": 0, "compute_dtype": "fp32", "tolerance": config.tolerance,
                              "max_rel_error": 0.0, "per_array": {}, "passed": True}
    if config.fidelity_samples == 0 or not shard_names:
        record["skipped"] = True
        return record
    encoder = PrecomputeEncoder(config, device=device, compute_dtype=torch.float32)
    chosen = choose_items(config.output, shard_names, config.fidelity_samples, config.seed)
    errors: dict[str, float] = {"latent": 0.0, "text": 0.0, "pooled": 0.0}
    worst: dict[str, Any] = {}
    for shard, keys in chosen.items():
        wanted = set(keys)
        stored = {k: m for k, m in iter_shard(storage.join(config.output, f"{shard}.tar")) if k in wanted}
        inputs = {}
        source = ShardRead(storage.join(config.input, f"{shard}.tar"), sha256="")  # its hash was checked when encoded
        for sample in read_shard(source, config.read_retries, config.read_backoff_s):
            if sample.key in wanted:
                inputs[sample.key] = sample
        for key in keys:
            members = stored[key]
            if key not in inputs:
                raise RuntimeError(f"fidelity: sample {key} is in the output but not in input shard {shard}")
            status, image, meta = preprocess_sample(inputs[key], config.resolution, config.resize_filter,
                                                    config.crop, config.seed, config.keep_empty_captions)
            if status != "ok":
                raise RuntimeError(f"fidelity: stored sample {key} now preprocesses as {status!r}")
            stored_meta = formats.decode_json(members["json"])
            for field in ("original_size", "crop_top_left", "target_size"):
                if stored_meta.get(field) != meta.get(field):
                    raise RuntimeError(f"fidelity: {key} {field} stored {stored_meta.get(field)} != {meta.get(field)}")
            latents, states, lengths, pooled = encoder.encode_arrays(image[None], [meta["caption"]], [key])
            length = int(lengths[0])
            arrays = {
                "latent": (members["latent.npy"], latents[0]),
                "text": (members["text.npy"], states[0, :length]),
                "pooled": (members["pooled.npy"], pooled[0]),
            }
            for name, (data, reference) in arrays.items():
                value = formats.storage_to_tensor(formats.decode_npy(data), config.dtype)
                if tuple(value.shape) != tuple(reference.shape):
                    raise RuntimeError(f"fidelity: {key} {name} shape {tuple(value.shape)} != {tuple(reference.shape)}")
                err = relative_error(value, reference)
                if err > errors[name]:
                    errors[name] = err
                    worst[name] = key
            record["samples"] += 1
    record["per_array"] = {k: float(v) for k, v in errors.items()}
    record["worst_key"] = worst
    record["max_rel_error"] = float(max(errors.values()))
    record["passed"] = bool(record["max_rel_error"] <= config.tolerance and np.isfinite(record["max_rel_error"]))
    return record
