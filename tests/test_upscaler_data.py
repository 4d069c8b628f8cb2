"""Super-resolution data: precompute's stored pixels, low-res pairs per (key, epoch), noise augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.manifest import ManifestError
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from latentforge.precompute.config import PrecomputeConfig
from latentforge.precompute.encode import PrecomputeEncoder
from latentforge.precompute.stage import pixels_record, plan_run
from latentforge.precompute.writer import ShardWriter
from latentforge.tar_samples import iter_shard
from latentforge import formats
from latentforge.upscaler import conditioning
from latentforge.upscaler.degradation import Degradation, bicubic_upsample, lowres_pixels
from tests.harness.ingest_shards import write_ingest_shards


def _images(n: int = 4, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _config(tmp_path, **kw) -> PrecomputeConfig:
    clip = save_tiny_clip_checkpoint(tmp_path / "clip.safetensors")
    return PrecomputeConfig(vae_type="patchify", text_encoder="lf-tiny-clip", text_encoder_weights=clip,
                            text_layer="last", resolution=16, dtype="fp32", **kw)


def test_store_pixels_keeps_the_preprocessed_image_in_the_shard(tmp_path) -> None:
    images = _images(2, 16)
    batch = {"key": np.array(["a", "b"]), "caption": np.array(["x", "y"], dtype=object),
             "status": np.array(["ok", "ok"]), "image": images, "meta": np.array(['{"key": "k"}'] * 2)}
    assert "image" not in PrecomputeEncoder(_config(tmp_path)).encode_batch(dict(batch))
    out = PrecomputeEncoder(_config(tmp_path, store_pixels=True)).encode_batch(dict(batch))
    writer = ShardWriter(str(tmp_path / "out"), "00000", "fp32")
    for i in range(2):
        writer.add({k: v[i] for k, v in out.items()})
    writer.expected = 2
    writer.finish()
    members = dict(iter_shard(str(tmp_path / "out" / "00000.tar")))
    np.testing.assert_array_equal(formats.decode_npy(members["b"]["pixels.npy"]), images[1])
    assert pixels_record(_config(tmp_path, store_pixels=True))["size"] == [16, 16]
    assert pixels_record(_config(tmp_path)) == {}


def test_resume_refuses_to_mix_outputs_with_and_without_pixels(tmp_path) -> None:
    from latentforge.config import config_to_dict
    from latentforge.manifest import Manifest, write_manifest

    write_ingest_shards(tmp_path / "in", shard_sizes=(2,))
    config = _config(tmp_path, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    old = config_to_dict(config)
    old.pop("store_pixels")  # an output written before the flag existed resumes without it
    write_manifest(str(tmp_path / "out"), Manifest(stage="precompute", config=old))
    assert len(plan_run(config).pending) == 1
    config.store_pixels = True
    with pytest.raises(ManifestError, match="store_pixels"):
        plan_run(config)
