"""Demo scenes as a super-resolution data set: real precompute parts (patchify VAE, tiny CLIP,
--store-pixels) without Ray, so upscaler tests train and sample on images they can score.

    info = write_scene_latents(tmp / "latents", clip_path, count=64, resolution=32)
    info.manifest.extra["pixels"]      # {"member": "pixels.npy", "size": [32, 32], ...}
    held_out_scenes(8, 32, seed=99)    # (uint8 (8, 32, 32, 3), captions) never in the data
    feed(info, config, plan, 0, steps)  # an upscaler's batches through the real feeder, without Ray
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np

from latentforge import formats
from latentforge.manifest import Manifest, ShardRecord
from latentforge.demo.scenes import caption_for, combinations, render_scene
from latentforge.precompute.config import PrecomputeConfig
from latentforge.precompute.encode import PrecomputeEncoder
from latentforge.precompute.stage import Plan, build_manifest, save, write_empty_caption
from latentforge.precompute.writer import ShardWriter


@dataclass
class SceneLatents:
    dir: Path
    manifest: Manifest
    keys: list[str]


def scenes(count: int, resolution: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`count` rendered scenes (uint8 (N, R, R, 3)) and their captions."""
    rng = random.Random(seed)
    combos = combinations()
    images, captions = [], []
    for _ in range(count):
        colour, shape, position = combos[rng.randrange(len(combos))]
        images.append(np.asarray(render_scene(colour, shape, position, resolution, rng).convert("RGB")))
        captions.append(caption_for(colour, shape, position))
    return np.stack(images), captions


held_out_scenes = scenes


def write_scene_latents(out_dir: str | Path, clip_path: str, count: int = 64, resolution: int = 32,
                        seed: int = 0, shard_size: int = 32, vae: str = "") -> SceneLatents:
    """`count` scenes encoded by the patchify autoencoder, or by the AutoencoderKL in directory `vae`."""
    out = Path(out_dir)
    kind = {"vae_type": "autoencoder_kl", "vae": vae} if vae else {"vae_type": "patchify", "patch_size": 2}
    config = PrecomputeConfig(input="scenes://", output=str(out), **kind,
                              text_encoder="lf-tiny-clip", text_encoder_weights=clip_path, text_layer="last",
                              resolution=resolution, dtype="fp32", store_pixels=True, fidelity_samples=0)
    encoder = PrecomputeEncoder(config, device="cpu")
    images, captions = scenes(count, resolution, seed)
    records: dict[str, ShardRecord] = {}
    keys: list[str] = []
    for shard, start in enumerate(range(0, count, shard_size)):
        stop = min(count, start + shard_size)
        shard_keys = [formats.sample_key(shard, i) for i in range(stop - start)]
        rows = encoder.encode_batch({
            "key": np.array(shard_keys), "caption": np.array(captions[start:stop], dtype=object),
            "status": np.array(["ok"] * len(shard_keys)), "image": images[start:stop],
            "meta": np.array([formats.encode_json({"key": k}).decode() for k in shard_keys])})
        writer = ShardWriter(str(out), formats.shard_name(shard), config.dtype)
        for i in range(len(shard_keys)):
            writer.add({k: v[i] for k, v in rows.items()})
        writer.expected = len(shard_keys)
        records[writer.name] = writer.finish()
        keys += shard_keys
    text, pooled, length = encoder.empty_caption()
    empty = write_empty_caption(str(out), text, pooled, length)
    plan = Plan(Manifest(stage="ingest", config={}), "0" * 64, pending=list(records.values()))
    manifest = build_manifest(config, plan, records, encoder.describe(), list(encoder.stored_latent_shape), empty, None)
    save(str(out), manifest)
    return SceneLatents(out, manifest, keys)


def make_trainer(info: SceneLatents, config: Any) -> Any:
    """An in-process `DiffusionTrainer` (CPU) for `config` (a TrainConfig, base or upscaler) on `info`."""
    from accelerate import Accelerator

    from latentforge.models.unet import resolve_unet_config
    from latentforge.training.data import read_empty_caption
    from latentforge.training.loop import DiffusionTrainer
    from latentforge.upscaler.training import upscaler_unet

    channels, size = info.manifest.extra["latent_shape"][0], info.manifest.extra["latent_shape"][1]
    width = info.manifest.models["text_encoder"]["width"]
    if config.stage == "upscaler":
        unet_config = upscaler_unet(config, info.manifest, channels, width, size)
    else:
        unet_config = resolve_unet_config(config.unet, channels, width, size)
    return DiffusionTrainer(config, unet_config, Accelerator(cpu=True), read_empty_caption(str(info.dir), info.manifest),
                            info.manifest.extra["latent"])


def export(trainer: Any, info: SceneLatents, out_dir: str | Path) -> str:
    """The trainer's model written as the train stage exports it (an upscaler with its `extra.upscaler`)."""
    from latentforge.config import config_to_dict
    from latentforge.manifest import manifest_digest
    from latentforge.training.export_writer import write_export
    from latentforge.upscaler.training import upscaler_setup

    record = (upscaler_setup(trainer.config, info.manifest).record(info.manifest)
              if trainer.config.stage == "upscaler" else None)
    write_export(str(out_dir), trainer.export_model(), trainer.noise_scheduler, str(info.dir),
                 manifest_digest(str(info.dir)), info.manifest, config_to_dict(trainer.config), trainer.step, None,
                 extra={"upscaler": record})
    return str(out_dir)


class ShardStream:
    """What a worker's Ray Data shard gives `BatchFeeder`: rows in file order, epoch after epoch."""

    def __init__(self, info: SceneLatents, plan: Any) -> None:
        from latentforge.training import data as tdata

        rows = tdata.read_positions(str(info.dir), plan, range(plan.total))
        self.rows = [{**r, "__url__": f"{info.dir}/{r['__key__'][:5]}.tar"} for r in rows]
        self.epochs = plan.epochs_per_stream(0)

    def iter_rows(self) -> Any:
        return itertools.chain.from_iterable(itertools.repeat(self.rows, self.epochs))


def feed(info: SceneLatents, config: Any, plan: Any, start_step: int, batches: int) -> list[dict]:
    """`batches` upscaler batches from step `start_step` on, made by the real feeder and low-res transform."""
    from latentforge.training.feeder import BatchFeeder
    from latentforge.upscaler.training import upscaler_setup

    setup = upscaler_setup(config, info.manifest)
    epoch, skip = plan.position_of(start_step)
    feeder = BatchFeeder(ShardStream(info, plan), plan, 0, epoch, skip, config.batch_size,
                         info.manifest.extra["dtype"], 1, batches, transform=setup.transform)
    try:
        return [feeder.get()[1] for _ in range(batches)]
    finally:
        feeder.close()
