"""Reading ingest shards and the explicit, recorded image preprocessing.

Preprocessing (recorded in the manifest's ``extra.preprocessing``):
1. decode the stored image, convert to RGB;
2. resize so the shorter side equals ``resolution`` (PIL ``resize_filter``);
3. crop ``resolution x resolution``: centre, or a random offset seeded by (seed, key);
4. pixels -> float in [-1, 1]: ``x / 127.5 - 1``.

Steps 1-3 run on CPU workers and yield uint8 HWC arrays (4x smaller than floats in the object
store); step 4 runs inside the encoder (``to_pixels``). Every sample records its
``original_size [h, w]`` (the source image's size before ingest resized it, when ingest recorded
it) and ``crop_top_left [top, left]`` in the resized image, for SDXL-style micro-conditioning.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

from latentforge import formats, tar_samples
from latentforge.conditioning.values import SKIP_MISSING_CONDITION, sample_conditions

FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
           "lanczos": Image.Resampling.LANCZOS}

STATUS_OK = "ok"
SKIP_EMPTY_CAPTION = "empty_caption"
SKIP_UNDECODABLE = "undecodable_image"
SKIP_MISSING_IMAGE = "missing_image"
SKIP_NONFINITE_LATENT = "nonfinite_latent"
SKIP_NONFINITE_TEXT = "nonfinite_text"
SKIP_REASONS = (SKIP_EMPTY_CAPTION, SKIP_UNDECODABLE, SKIP_MISSING_IMAGE, SKIP_NONFINITE_LATENT, SKIP_NONFINITE_TEXT,
                SKIP_MISSING_CONDITION)


def preprocessing_record(resolution: int, resize_filter: str, crop: str, seed: int) -> dict[str, Any]:
    """What ``extra.preprocessing`` records, so training/eval can reproduce it exactly."""
    return {"resize": "shorter_side", "resize_filter": resize_filter, "crop": crop, "crop_seed": seed,
            "size": [resolution, resolution], "range": [-1.0, 1.0], "formula": "x / 127.5 - 1",
            "color": "RGB"}


@dataclass
class IngestSample:
    """One sample of an ingest shard: its members by extension (``jpg``, ``txt``, ``json``, ...)."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def caption(self) -> str:
        if "txt" in self.members:
            return self.members["txt"].decode("utf-8", errors="replace")
        meta = self.meta
        return str(meta.get("caption") or "")

    @property
    def meta(self) -> dict[str, Any]:
        try:
            return formats.decode_json(self.members["json"]) if "json" in self.members else {}
        except ValueError:
            return {}

    @property
    def image_bytes(self) -> bytes | None:
        for ext in formats.IMAGE_EXTENSIONS + ("jpeg",):
            if ext in self.members:
                return self.members[ext]
        return None


def iter_ingest_shard(uri: str) -> Iterator[IngestSample]:
    """Stream the samples of one WebDataset tar (members grouped by key, in tar order)."""
    for key, members in tar_samples.iter_shard(uri):
        yield IngestSample(key, members)


def crop_offset(size: tuple[int, int], resolution: int, crop: str, seed: int, key: str) -> tuple[int, int]:
    """(top, left) of the crop in the resized (h, w) image; random crops are seeded by (seed, key)."""
    h, w = size
    if crop == "center":
        return (h - resolution) // 2, (w - resolution) // 2
    digest = hashlib.sha256(f"{seed}:{key}:crop".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))


def decode_rgb(data: bytes) -> Image.Image:
    """Decode stored image bytes to RGB; raises on undecodable or empty images."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = image.convert("RGB")
    if min(rgb.size) < 1:
        raise ValueError("empty image")
    return rgb


def resize_crop(rgb: Image.Image, resolution: int, resize_filter: str = "bicubic", crop: str = "center",
                seed: int = 0, key: str = "") -> tuple[np.ndarray, dict[str, Any]]:
    """Resize (shorter side) and crop a decoded image: (uint8 array (R, R, 3), geometry record)."""
    w, h = rgb.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), FILTERS[resize_filter])
    top, left = crop_offset((new_h, new_w), resolution, crop, seed, key)
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(rgb, dtype=np.uint8)
    return array, {"decoded_size": [h, w], "crop_top_left": [top, left], "target_size": [resolution, resolution]}


def preprocess_image(data: bytes, resolution: int, resize_filter: str = "bicubic", crop: str = "center",
                     seed: int = 0, key: str = "") -> tuple[np.ndarray, dict[str, Any]]:
    """Decode, resize (shorter side) and crop: (uint8 array (R, R, 3), geometry record).

    Raises on undecodable bytes (the caller counts the sample as skipped).
    """
    return resize_crop(decode_rgb(data), resolution, resize_filter, crop, seed, key)


def original_size(meta: dict[str, Any], decoded_size: list[int]) -> list[int]:
    """[h, w] of the source image: ingest's original_height/width when recorded, else as decoded."""
    try:
        h, w = int(meta["original_height"]), int(meta["original_width"])
        if h > 0 and w > 0:
            return [h, w]
    except (KeyError, TypeError, ValueError):
        pass
    return list(decoded_size)


def preprocess_sample(sample: IngestSample, resolution: int, resize_filter: str, crop: str, seed: int,
                      keep_empty_captions: bool, conditions: tuple = ()) -> tuple[str, np.ndarray | None, dict[str, Any]]:
    """(status, uint8 image or None, json record without text_length) for one ingest sample."""
    status, images, records = preprocess_resolutions(sample, (resolution,), resize_filter, crop, seed,
                                                     keep_empty_captions, conditions)
    return status, images.get(resolution), records[resolution]


def preprocess_resolutions(sample: IngestSample, resolutions: tuple[int, ...], resize_filter: str, crop: str,
                           seed: int, keep_empty_captions: bool, conditions: tuple = ()
                           ) -> tuple[str, dict[int, np.ndarray], dict[int, dict[str, Any]]]:
    """(status, {resolution: uint8 image} (empty unless ok), {resolution: json record}) for one ingest sample.

    The image is decoded once for all resolutions, so a sample is ok or skipped (same reason) in every one.
    """
    caption = sample.caption
    record: dict[str, Any] = {"key": sample.key, "caption": caption}
    skipped = {r: record for r in resolutions}
    if not caption.strip() and not keep_empty_captions:
        return SKIP_EMPTY_CAPTION, {}, skipped
    if conditions:  # the kept metadata columns (latentforge.conditioning.values)
        record["conditions"] = sample_conditions(sample.meta, conditions)
        if record["conditions"] is None:
            return SKIP_MISSING_CONDITION, {}, skipped
    data = sample.image_bytes
    if data is None:
        return SKIP_MISSING_IMAGE, {}, skipped
    try:
        rgb = decode_rgb(data)
        resized = {r: resize_crop(rgb, r, resize_filter, crop, seed, sample.key) for r in resolutions}
    except Exception:  # noqa: BLE001 - any decode failure is one skipped sample, never a failed block
        return SKIP_UNDECODABLE, {}, skipped
    records = {r: {**record, "original_size": original_size(sample.meta, geometry["decoded_size"]),
                   "crop_top_left": geometry["crop_top_left"], "target_size": geometry["target_size"]}
               for r, (_, geometry) in resized.items()}
    return STATUS_OK, {r: image for r, (image, _) in resized.items()}, records
