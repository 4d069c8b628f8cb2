"""Small ingest-format shard directories for precompute tests (no ingest job needed).

Follows docs/architecture.md "Ingest output": `NNNNN.tar` WebDataset shards with `{key}.jpg|png`,
`{key}.txt`, `{key}.json`, written with webdataset's TarWriter, and a `Manifest(stage="ingest")`.
Images vary in size and aspect so resize/crop are exercised; `bad=True` adds one undecodable
image and one empty caption per shard (the reasons precompute must count and leave out).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from latentforge import formats, storage
from latentforge.manifest import Manifest, ShardRecord, write_manifest

SIZES = [(40, 48), (48, 40), (32, 32), (64, 36), (37, 53)]


@dataclass
class IngestShardsInfo:
    dir: Path
    manifest: Manifest
    keys: list[str] = field(default_factory=list)
    """Every sample key written."""
    good: list[str] = field(default_factory=list)
    """Keys precompute must store (decodable image, non-empty caption)."""
    undecodable: list[str] = field(default_factory=list)
    empty_caption: list[str] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)


def _image_bytes(rng: np.random.Generator, size: tuple[int, int], fmt: str) -> bytes:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 255 // (w + h)], -1)
    noise = rng.integers(0, 40, (h, w, 3))
    array = np.clip(base + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def write_ingest_shards(out_dir: str | Path, shard_sizes: Sequence[int] = (12, 12), bad: bool = True,
                        seed: int = 0) -> IngestShardsInfo:
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    info = IngestShardsInfo(dir=out, manifest=None)  # type: ignore[arg-type]
    records = []
    for shard, count in enumerate(shard_sizes):
        name = formats.shard_name(shard)
        path = out / f"{name}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            index = 0
            for i in range(count):
                index += 1 if i % 5 == 3 else 0  # key gaps, like failed downloads
                key = formats.sample_key(shard, index)
                index += 1
                size = SIZES[i % len(SIZES)]
                fmt, ext = ("PNG", "png") if i % 4 == 1 else ("JPEG", "jpg")
                caption = f"a picture number {i} of shard {shard} &amp; friends!"
                image = _image_bytes(rng, size, fmt)
                if bad and i == 2:
                    image = b"\xff\xd8 this is not a jpeg"
                    info.undecodable.append(key)
                elif bad and i == 5:
                    caption = "   "
                    info.empty_caption.append(key)
                else:
                    info.good.append(key)
                meta = {"key": key, "url": f"http://127.0.0.1/{key}.{ext}", "caption": caption,
                        "width": size[0], "height": size[1], "original_width": size[0] * 2,
                        "original_height": size[1] * 2, "sha256": storage.sha256_bytes(image)}
                sink.write({"__key__": key, ext: image, "txt": caption, "json": meta})
                info.keys.append(key)
                info.captions[key] = caption
        records.append(ShardRecord(name=name, samples=count, sha256=storage.sha256_file(str(path)),
                                   stats={"ok": count}))
    manifest = Manifest(stage="ingest", config={"synthetic": True, "seed": seed}, shards=records,
                        counts={"rows": int(sum(shard_sizes)), "ok": int(sum(shard_sizes))})
    write_manifest(str(out), manifest)
    info.manifest = manifest
    return info
