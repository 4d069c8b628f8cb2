"""A tiny synthetic *precompute* dataset (latent shards + manifest) for train/generate/eval tests.

It follows the "Precompute output" contract in docs/architecture.md exactly, but needs no VAE,
text encoder or images, so stage tests do not depend on the precompute job. The data is
learnable: every sample belongs to one of `num_concepts` concepts; its text states are that
concept's embedding (plus noise, variable length) and its latent is that concept's spatial
pattern (plus noise), so a conditional UNet can lower its loss quickly and a
"loss decreases" assertion is real.

    from tests.harness.latent_shards import write_latent_dataset
    info = write_latent_dataset(tmp_path / "latents", shard_sizes=[24, 8])
    info.keys          # every sample key, in shard order
    info.manifest      # the Manifest(stage="precompute") written to DIR/manifest.json
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from latentforge import formats, storage
from latentforge.manifest import Manifest, ShardRecord, write_manifest


@dataclass
class LatentDatasetInfo:
    dir: Path
    manifest: Manifest
    keys: list[str]
    concept_of: dict[str, int] = field(default_factory=dict)
    """Key -> concept index (what the caption/text states encode)."""


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_latent_dataset(
    out_dir: str | Path,
    shard_sizes: Sequence[int] = (16, 16),
    latent_channels: int = 4,
    latent_size: int = 8,
    width: int = 32,
    context_length: int = 16,
    dtype: str = "fp32",
    latent: str = "mean",
    num_concepts: int = 4,
    key_gaps: bool = True,
    seed: int = 0,
    vae_type: str = "autoencoder_kl",
    models: dict | None = None,
) -> LatentDatasetInfo:
    """Write `len(shard_sizes)` latent shards and a precompute manifest into `out_dir`.

    `latent="mean_std"` stores `(2, C, h, w)` = [mean, std] per sample (posterior sampling in
    training); `models` replaces manifest `models` entries (e.g. a real tiny open_clip record so
    the in-training evaluator can load it); `key_gaps` leaves holes in the key indices like failed downloads do, so code
    that wrongly assumes `key index == position in the shard` is caught.
    """
    if latent not in ("mean", "mean_std"):
        raise ValueError(f"latent must be 'mean' or 'mean_std', got {latent!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    concept_text = rng.normal(0, 1, (num_concepts, width)).astype(np.float32)
    concept_latent = rng.normal(0, 1, (num_concepts, latent_channels, latent_size, latent_size)).astype(np.float32)
    keys: list[str] = []
    concept_of: dict[str, int] = {}
    records = []
    for shard, count in enumerate(shard_sizes):
        name = formats.shard_name(shard)
        tar_path = out / f"{name}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            index = 0
            for _ in range(count):
                index += 1 if (key_gaps and rng.random() < 0.2) else 0  # a "failed download"
                key = formats.sample_key(shard, index)
                index += 1
                concept = int(rng.integers(num_concepts))
                length = int(rng.integers(3, context_length + 1))
                text = concept_text[concept][None, :] + 0.1 * rng.normal(0, 1, (length, width))
                pooled = text.mean(axis=0)
                mean = concept_latent[concept] + 0.1 * rng.normal(0, 1, concept_latent[concept].shape)
                if latent == "mean_std":
                    stored = np.stack([mean, np.full_like(mean, 0.05)])
                else:
                    stored = mean
                caption = f"concept {concept} sample {key}"
                meta = {"key": key, "caption": caption, "original_size": [latent_size * 8] * 2,
                        "crop_top_left": [0, 0], "target_size": [latent_size * 8] * 2, "text_length": length}
                members = {
                    "latent.npy": formats.encode_npy(formats.tensor_to_storage(torch.from_numpy(stored.astype(np.float32)), dtype)),
                    "text.npy": formats.encode_npy(formats.tensor_to_storage(torch.from_numpy(text.astype(np.float32)), dtype)),
                    "pooled.npy": formats.encode_npy(formats.tensor_to_storage(torch.from_numpy(pooled.astype(np.float32)), dtype)),
                    "txt": caption.encode(),
                    "json": formats.encode_json(meta),
                }
                for suffix, data in members.items():
                    _tar_member(tar, f"{key}.{suffix}", data)
                keys.append(key)
                concept_of[key] = concept
        records.append(ShardRecord(name=name, samples=count, sha256=storage.sha256_file(str(tar_path)),
                                   stats={"latent_mean": float(concept_latent.mean())}))
    empty_text = formats.tensor_to_storage(torch.zeros(1, width), dtype)
    empty_pooled = formats.tensor_to_storage(torch.zeros(width), dtype)
    (out / "empty_text.npy").write_bytes(formats.encode_npy(empty_text))
    (out / "empty_pooled.npy").write_bytes(formats.encode_npy(empty_pooled))
    empty_files = ["empty_text.npy", "empty_pooled.npy"]
    manifest = Manifest(
        stage="precompute",
        config={"synthetic": True, "seed": seed, "dtype": dtype, "latent": latent},
        inputs=[{"uri": "synthetic://latent_shards", "sha256": "0" * 64, "kind": "manifest"}],
        shards=records,
        counts={"samples": int(sum(shard_sizes)), "ok": int(sum(shard_sizes))},
        models={
            "vae": {"type": vae_type, "id": "synthetic", "scaling_factor": 1.0, "shift_factor": 0.0,
                    "latent_channels": latent_channels, "downsample": 8},
            "text_encoder": {"name": "synthetic", "weights": None, "layer": "last",
                             "context_length": context_length, "width": width, "pooled_dim": width},
            **(models or {}),
        },
        extra={
            "dtype": dtype,
            "latent": latent,
            "latent_shape": [latent_channels, latent_size, latent_size],
            "resolution": latent_size * 8,
            "preprocessing": {"resize": "shorter_side", "crop": "center"},
            "empty_caption": {"files": empty_files,
                              "sha256": {f: storage.sha256_file(str(out / f)) for f in empty_files}},
            "fidelity": {},
        },
    )
    write_manifest(str(out), manifest)
    return LatentDatasetInfo(dir=out, manifest=manifest, keys=keys, concept_of=concept_of)
