"""Deterministic data order for exact mid-epoch resume, sample decoding and batch collation.

The order is a pure function of (manifest, world size, seed, epoch):

1. The manifest's shards (sorted by name) are concatenated into one sequence of N samples
   (position p = shard offset + position inside the tar). The last `val_samples` are held out.
2. Worker r owns the contiguous range [r*T//W, (r+1)*T//W) of the T training samples, so
   worker sizes differ by at most one sample however uneven the shards are, and each worker
   reads only the shards overlapping its range (streamed by Ray Data in file order).
3. Epoch e of worker r cuts its range into windows of `shuffle_buffer` samples and permutes each
   window with a generator seeded by (seed, e, r, window): a local shuffle that is fresh every
   epoch yet reproducible.
4. Every worker runs the same `steps_per_epoch = (T//W) // (batch_size*grad_accum)` steps per
   epoch, so no rank ever waits on a collective another rank will not reach; the at most
   `samples_per_step - 1 + 1` leftover samples of a worker are the tail of its last (permuted)
   window, so which samples are dropped changes from epoch to epoch.

The data position is therefore just (epoch, samples consumed in the epoch), identical on every
rank; a resumed worker skips exactly that many samples of the same order - nothing is replayed
or skipped. Ray Data's `streaming_split` hands blocks to workers dynamically, which cannot be
replayed exactly, hence one deterministic dataset per rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from latentforge import formats, storage, tar_samples
from latentforge.conditioning.values import MEMBER as CONDITIONS_MEMBER
from latentforge.manifest import Manifest

TAR_FIELDS = ("latent.npy", "text.npy", CONDITIONS_MEMBER, formats.PIXELS_MEMBER)


class DataPlanError(ValueError):
    """The dataset cannot feed this run (too small for the batch, changed since the checkpoint, ...)."""


@dataclass
class DataPlan:
    shard_names: list[str]
    shard_sizes: list[int]
    world_size: int
    samples_per_step: int
    shuffle_buffer: int
    seed: int
    val_samples: int

    @property
    def offsets(self) -> list[int]:
        return [int(x) for x in np.concatenate([[0], np.cumsum(self.shard_sizes)])[:-1]]

    @property
    def total(self) -> int:
        return int(sum(self.shard_sizes))

    @property
    def train_total(self) -> int:
        return self.total - self.val_samples

    def rank_range(self, rank: int) -> tuple[int, int]:
        t, w = self.train_total, self.world_size
        return rank * t // w, (rank + 1) * t // w

    @property
    def steps_per_epoch(self) -> int:
        return (self.train_total // self.world_size) // self.samples_per_step

    @property
    def samples_per_epoch(self) -> int:
        """Samples each rank consumes per epoch."""
        return self.steps_per_epoch * self.samples_per_step

    def rank_shards(self, rank: int) -> list[str]:
        """Shards overlapping worker `rank`'s range, in order."""
        lo, hi = self.rank_range(rank)
        out = []
        for name, offset, size in zip(self.shard_names, self.offsets, self.shard_sizes):
            if offset < hi and offset + size > lo and size > 0:
                out.append(name)
        return out

    def epochs_per_stream(self, rank: int, max_shards: int = 32) -> int:
        """Epochs one Ray Data execution streams to `rank` (its shard list repeated).

        Every new execution starts Ray Data's streaming executor inside the training process,
        ~0.5 s of GIL-bound work that stalls the step; repeating a short shard list amortises that
        over many epochs, while `max_shards` bounds the plan of a long one.
        """
        return max(1, max_shards // max(1, len(self.rank_shards(rank))))

    def val_positions(self) -> list[int]:
        return list(range(self.train_total, self.total))

    def position_of(self, step: int) -> tuple[int, int]:
        """(epoch, samples consumed in that epoch by each rank) after `step` optimizer steps."""
        return step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.samples_per_step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_one_dataset(data_dir: str, manifest: Manifest) -> None:
    """Refuse the parent of a precompute --resolutions run: it lists datasets, it holds none (DataPlanError)."""
    from latentforge.precompute.resolutions import is_parent, sub_dirs

    if is_parent(manifest):
        raise DataPlanError(f"{data_dir} holds one precompute dataset per resolution, not one dataset: "
                            f"train on one of {', '.join(sub_dirs(data_dir, manifest))}")


def plan_data(manifest: Manifest, world_size: int, samples_per_step: int, shuffle_buffer: int, seed: int,
              val_samples: int = 0) -> DataPlan:
    plan = DataPlan(shard_names=[s.name for s in manifest.shards], shard_sizes=[int(s.samples) for s in manifest.shards],
                    world_size=world_size, samples_per_step=samples_per_step, shuffle_buffer=shuffle_buffer,
                    seed=seed, val_samples=val_samples)
    if val_samples >= plan.total:
        raise DataPlanError(f"val_samples {val_samples} leaves no training data ({plan.total} samples)")
    if plan.steps_per_epoch < 1:
        raise DataPlanError(
            f"{plan.train_total} training samples cannot give each of {world_size} workers one step of "
            f"{samples_per_step} samples (batch_size * grad_accum); use a smaller batch or fewer workers")
    return plan


def check_same_plan(saved: dict[str, Any], plan: DataPlan) -> None:
    """A checkpoint's data position only means something for the same data order."""
    current = plan.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in current if saved.get(k) != current[k]]
    if diffs:
        raise DataPlanError("the checkpoint's data position was made for a different data order (" + "; ".join(diffs)
                            + "); resume with the original data, num_workers, batch_size, grad_accum, "
                            "shuffle_buffer, seed and val_samples, or start a new run name")


def shard_of_url(url: str) -> str:
    """'/data/latents/00003.tar' -> '00003'."""
    return url.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def rank_rows(rows: Iterator[dict[str, Any]], plan: DataPlan, rank: int) -> Iterator[dict[str, Any]]:
    """Rows of this rank's range, in order, from one epoch of the rank's shards in file order.

    Exhausting it consumes exactly one epoch's rows (every sample of each of the rank's shards)
    from `rows`, so one stream can carry several epochs back to back. Each row needs `__url__`
    (its tar) so the position inside the shard can be checked; a shard that delivers a different
    number of samples than the manifest says is an error.
    """
    lo, hi = plan.rank_range(rank)
    sizes = dict(zip(plan.shard_names, plan.shard_sizes))
    offsets = dict(zip(plan.shard_names, plan.offsets))
    for name in plan.rank_shards(rank):
        for index in range(sizes[name]):
            row = next(rows, None)
            shard = None if row is None else shard_of_url(str(row["__url__"]))
            if shard != name:
                raise DataPlanError(f"shard {name} delivered {index} samples, the manifest says {sizes[name]} "
                                    f"(next came {'the end of the stream' if row is None else 'shard ' + str(shard)})")
            if lo <= offsets[name] + index < hi:
                yield row


def window_permutation(size: int, seed: int, epoch: int, rank: int, window: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, rank, window]).permutation(size)


def shuffled_epoch(rows: Iterable[Any], plan: DataPlan, rank: int, epoch: int, skip: int = 0) -> Iterator[Any]:
    """This rank's epoch order: windowed local shuffle, the first `skip` samples left out.

    Yields exactly `plan.samples_per_epoch - skip` items (raises if the stream runs short).
    """
    take = plan.samples_per_epoch
    buffer_size = plan.shuffle_buffer
    emitted = 0  # position in the epoch order
    window: list[Any] = []
    window_index = 0

    def flush() -> Iterator[Any]:
        nonlocal emitted
        start = emitted
        if start + len(window) <= skip:  # the whole window was consumed before the checkpoint
            emitted += len(window)
            return
        for j in window_permutation(len(window), plan.seed, epoch, rank, window_index):
            if emitted >= take:
                return
            if emitted >= skip:
                yield window[j]
            emitted += 1

    for row in rows:
        window.append(row)
        if len(window) == buffer_size:
            yield from flush()
            window, window_index = [], window_index + 1
            if emitted >= take:
                return
    if window:
        yield from flush()
    if emitted < take:
        raise DataPlanError(f"rank {rank} epoch {epoch}: the data ran out after {emitted} of {take} samples")


def decode_row(row: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Tar members (bytes) -> float32 tensors: latent (C,h,w) or (2,C,h,w), text (L,D)."""
    latent = formats.storage_to_tensor(formats.decode_npy(row["latent.npy"]), dtype).float()
    text = formats.storage_to_tensor(formats.decode_npy(row["text.npy"]), dtype).float()
    sample = {"key": str(row["__key__"]), "latent": latent, "text": text}
    if row.get(CONDITIONS_MEMBER) is not None:  # raw condition values; the trainer maps them to class labels
        sample["conditions"] = formats.decode_json(row[CONDITIONS_MEMBER])
    return sample


def collate(samples: list[dict[str, Any]], min_length: int = 1) -> dict[str, Any]:
    """Stack latents; pad text states to the batch's longest (at least `min_length`) with a mask.

    Returns latents (B, ...) float32, text (B, L, D) float32, mask (B, L) int64 (1 = real token),
    keys [B].
    """
    length = max(min_length, max(s["text"].shape[0] for s in samples))
    width = samples[0]["text"].shape[1]
    text = torch.zeros(len(samples), length, width)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, s in enumerate(samples):
        n = s["text"].shape[0]
        text[i, :n] = s["text"]
        mask[i, :n] = 1
    batch = {"latents": torch.stack([s["latent"] for s in samples]), "text": text, "mask": mask,
             "keys": [s["key"] for s in samples]}
    if "conditions" in samples[0]:
        batch["conditions"] = [s["conditions"] for s in samples]  # B dicts {name: raw value}
    if "lowres" in samples[0]:
        batch["lowres"] = torch.stack([s["lowres"] for s in samples])  # (B, 3, h, w) an upscaler's input
    return batch


def read_empty_caption(data_dir: str, manifest: Manifest) -> torch.Tensor:
    """The empty caption's text states (L_e, D) float32 (for CFG dropout)."""
    dtype = manifest.extra.get("dtype", "fp32")
    fs, path = storage.filesystem(storage.join(data_dir, "empty_text.npy"))
    if not fs.exists(path):
        raise DataPlanError(f"{data_dir} has no empty_text.npy (needed for CFG caption dropout)")
    with fs.open(path, "rb") as handle:
        array = formats.decode_npy(handle.read())
    return formats.storage_to_tensor(array, dtype).float().reshape(-1, array.shape[-1])


def read_positions(data_dir: str, plan: DataPlan, positions: Iterable[int]) -> list[dict[str, Any]]:
    """Raw rows (tar members as bytes, `__key__`) at global positions, read straight from the tars.

    For the small held-out validation set; training data always streams through Ray Data.
    """
    wanted = sorted(set(positions))
    by_shard: dict[str, set[int]] = {}
    for pos in wanted:
        for name, offset, size in zip(plan.shard_names, plan.offsets, plan.shard_sizes):
            if offset <= pos < offset + size:
                by_shard.setdefault(name, set()).add(pos - offset)
    rows: list[dict[str, Any]] = []
    for name, indices in by_shard.items():
        for index, (key, members) in enumerate(tar_samples.iter_shard(storage.join(data_dir, f"{name}.tar"))):
            if index in indices:
                rows.append({"__key__": key, **{s: d for s, d in members.items() if s in TAR_FIELDS}})
    return rows

