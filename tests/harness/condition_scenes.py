"""Demo scenes as ingest shards with metadata columns, and precompute's real parts run in-process.

`write_scene_shards` renders `latentforge.demo.scenes` images into ingest-format tars whose
per-sample JSON carries the scene's columns (colour, shape, position, plus a numeric `score`),
as ingest writes a URL list's extra columns, and an ingest manifest recording each input
file's columns. `precompute_in_process` runs the precompute stage's own functions (plan,
shard reader, encoder, shard sink, manifest) without Ray, so condition tests stay fast.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from latentforge import formats, storage
from latentforge.demo.scenes import POSITIONS, SHAPES, caption_for, render_scene
from latentforge.manifest import Manifest, ShardRecord, write_manifest
from latentforge.precompute.config import PrecomputeConfig


def scene_meta(index: int, colour: str, shape: str, position: str) -> dict[str, Any]:
    """The extra columns one URL-list row of the demo carries, plus a numeric score."""
    return {"colour": colour, "shape": shape, "position": position, "score": float(index % 7) + 0.5}


def write_scene_shards(out_dir: str | Path, shard_sizes: Sequence[int], image_size: int = 16,
                       colours: Sequence[str] = ("red",), positions: Sequence[str] = tuple(POSITIONS),
                       meta_edit: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None,
                       file_columns: Sequence[Sequence[str]] | None = None, seed: int = 0,
                       jitter: bool = True) -> Path:
    """Ingest shards of scenes cycling shapes fastest; `meta_edit(i, meta)` may change a sample's metadata,
    `file_columns` is what the ingest manifest records as each input file's columns (None: the scene's).
    `jitter=False` renders every scene with the same draws, so equal columns give equal images."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records, index = [], 0
    for shard, count in enumerate(shard_sizes):
        name = formats.shard_name(shard)
        with wds.TarWriter(str(out / f"{name}.tar"), mtime=0) as sink:
            for _ in range(count):
                shape, colour = SHAPES[index % len(SHAPES)], colours[(index // 3) % len(colours)]
                position = positions[(index // 3 // len(colours)) % len(positions)]
                draws = rng if jitter else random.Random(seed)
                buffer = io.BytesIO()
                render_scene(colour, shape, position, image_size, draws).save(buffer, format="PNG")
                key = formats.sample_key(shard, index)
                meta = {"key": key, **scene_meta(index, colour, shape, position)}
                meta = meta_edit(index, meta) if meta_edit else meta
                sink.write({"__key__": key, "png": buffer.getvalue(), "txt": caption_for(colour, shape, position),
                            "json": meta})
                index += 1
        records.append(ShardRecord(name=name, samples=count, sha256=storage.sha256_file(str(out / f"{name}.tar"))))
    columns = file_columns if file_columns is not None else [list(scene_meta(0, "red", "circle", "left"))]
    files = [{"uri": f"urls{i}.parquet", "rows": 1, "columns": list(c)} for i, c in enumerate(columns)]
    write_manifest(str(out), Manifest(stage="ingest", config={"synthetic": True}, shards=records,
                                      extra={"files": files}))
    return out


def precompute_in_process(config: PrecomputeConfig) -> Manifest:
    """The precompute stage without Ray: its plan, shard reader, encoder, sink and manifest, in order."""
    from latentforge.precompute.encode import PrecomputeEncoder
    from latentforge.precompute.stage import build_manifest, plan_run, save, write_empty_caption
    from latentforge.precompute.writer import ShardSink
    from pipelines.precompute import read_shards

    plan = plan_run(config)
    encoder = PrecomputeEncoder(config, device="cpu")
    storage.makedirs(config.output)
    empty = write_empty_caption(config.output, *encoder.empty_caption())
    records: dict[str, ShardRecord] = {}
    sink = ShardSink(config, {s.name: s for s in plan.pending}, records, lambda: None, {})
    preprocess = {"resolution": config.resolution, "resize_filter": config.resize_filter, "crop": config.crop,
                  "seed": config.seed, "keep_empty_captions": config.keep_empty_captions,
                  "conditions": tuple(config.condition_columns)}
    shards = {"shard": np.array([s.name for s in plan.pending]), "sha256": np.array([s.sha256 for s in plan.pending])}
    for block in read_shards(shards, input_dir=config.input, preprocess=preprocess, rows_per_block=config.batch_size,
                             batch_size=config.batch_size, retries=0, backoff_s=0.0):
        out = encoder.encode_batch(block)
        for i in range(len(out["key"])):
            sink.add({name: out[name][i] for name in out})
    manifest = build_manifest(config, plan, records, encoder.describe(), list(encoder.latent_shape), empty, None)
    save(config.output, manifest)
    return manifest
