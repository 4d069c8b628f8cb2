"""Images for the autoencoder stage: ingest shards -> fixed-size uint8 crops, in a resumable order.

The preprocessing is precompute's own (`latentforge.precompute.preprocess`: decode, RGB, resize
the shorter side, centre crop), so the autoencoder trains on exactly the pixels precompute will
later encode with it. Captions play no part: empty captions are kept.

Each Ray Train rank reads its own shards (dealt round-robin) as an endless stream of epochs. An
epoch visits the rank's shards in a seeded order and each shard's samples in a seeded order, so
the position `(epoch, shard_index, sample_index)` plus the skip counts is the whole state of the
stream: a checkpoint stores it and a resumed run reads on from the very next sample (the samples
of the current shard before it are skipped without being decoded).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from latentforge import storage
from latentforge.manifest import Manifest
from latentforge.precompute.preprocess import STATUS_OK, IngestSample, iter_ingest_shard, preprocess_sample

CROP = "center"


class NoImagesError(RuntimeError):
    """A rank's shards hold no decodable image outside the held-out set."""


def preprocess(sample: IngestSample, resolution: int, resize_filter: str) -> tuple[str, np.ndarray | None]:
    """(status, uint8 (R, R, 3) or None): precompute's preprocessing, captions ignored."""
    status, image, _record = preprocess_sample(sample, resolution, resize_filter, CROP, 0, keep_empty_captions=True)
    return status, image


def deal_shards(manifest: Manifest, num_workers: int) -> list[list[str]]:
    """Shard names per rank, round-robin; every rank needs at least one shard."""
    names = [s.name for s in manifest.shards]
    if len(names) < num_workers:
        raise ValueError(f"the data has {len(names)} shard(s) for {num_workers} workers; each worker reads whole "
                         "shards, so use at most as many workers as shards")
    return [names[rank::num_workers] for rank in range(num_workers)]


def held_out(data_dir: str, manifest: Manifest, count: int, resolution: int,
             resize_filter: str) -> tuple[list[str], np.ndarray]:
    """The first `count` decodable images of the last shard(s): (keys, uint8 (N, R, R, 3)).

    They are never trained on; PSNR / SSIM are measured on them.
    """
    keys: list[str] = []
    images: list[np.ndarray] = []
    for record in reversed(manifest.shards):
        for sample in iter_ingest_shard(storage.join(data_dir, f"{record.name}.tar")):
            if len(keys) == count:
                break
            status, image = preprocess(sample, resolution, resize_filter)
            if status == STATUS_OK and sample.key not in keys:
                keys.append(sample.key)
                images.append(image)
        if len(keys) == count:
            break
    stacked = np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8)
    return keys, stacked


@dataclass
class StreamPosition:
    """Where a rank's stream stands: the next sample to read, and what was skipped so far."""

    epoch: int = 0
    shard_index: int = 0
    sample_index: int = 0
    images: int = 0
    """Images delivered so far (all epochs)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples left out in the first epoch, by reason (undecodable_image, missing_image)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageStream:
    """One rank's endless, seeded, resumable stream of preprocessed images."""

    def __init__(self, data_dir: str, shards: Sequence[str], resolution: int, resize_filter: str, seed: int,
                 rank: int, exclude: Sequence[str] = (), position: StreamPosition | None = None) -> None:
        self.data_dir, self.shards = data_dir, list(shards)
        self.resolution, self.resize_filter = resolution, resize_filter
        self.seed, self.rank = seed, rank
        self.exclude = frozenset(exclude)
        self.position = position or StreamPosition()
        self._cache: tuple[tuple[int, int], list[IngestSample]] | None = None

    def _rng(self, *parts: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, *parts])

    def _shard_samples(self) -> list[IngestSample]:
        """The current shard's samples in this epoch's order (read once per shard)."""
        pos = self.position
        ident = (pos.epoch, pos.shard_index)
        if self._cache is None or self._cache[0] != ident:
            order = self._rng(pos.epoch).permutation(len(self.shards))
            name = self.shards[int(order[pos.shard_index])]
            samples = [s for s in iter_ingest_shard(storage.join(self.data_dir, f"{name}.tar"))
                       if s.key not in self.exclude]
            permutation = self._rng(pos.epoch, pos.shard_index).permutation(len(samples))
            self._cache = (ident, [samples[int(i)] for i in permutation])
        return self._cache[1]

    def _advance(self, shard_length: int) -> None:
        pos = self.position
        pos.sample_index += 1
        if pos.sample_index >= shard_length:
            pos.shard_index, pos.sample_index = pos.shard_index + 1, 0
            if pos.shard_index >= len(self.shards):
                pos.epoch, pos.shard_index = pos.epoch + 1, 0

    def next_image(self) -> np.ndarray:
        """The next decodable image (R, R, 3) uint8; raises NoImagesError after a whole epoch without one."""
        start = (self.position.epoch, self.position.shard_index, self.position.sample_index)
        while True:
            samples = self._shard_samples()
            if not samples:
                self._advance(0)
            else:
                sample = samples[self.position.sample_index]
                status, image = preprocess(sample, self.resolution, self.resize_filter)
                if status != STATUS_OK and self.position.epoch == 0:
                    self.position.skipped[status] = self.position.skipped.get(status, 0) + 1
                self._advance(len(samples))
                if image is not None:
                    self.position.images += 1
                    return image
            if self.position.epoch >= start[0] + 2:
                raise NoImagesError(f"rank {self.rank}: shards {self.shards} hold no decodable image outside the "
                                    "held-out set")

    def next_batch(self, batch_size: int) -> np.ndarray:
        """(B, R, R, 3) uint8."""
        return np.stack([self.next_image() for _ in range(batch_size)])


def total_skipped(positions: Sequence[StreamPosition]) -> dict[str, int]:
    counts: Counter = Counter()
    for position in positions:
        counts.update(position.skipped)
    return dict(counts)
