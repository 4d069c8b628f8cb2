"""Precompute throughput: the Ray Data pipeline vs a plain single-process loop on the same shards.

    .venv/bin/python benchmarks/precompute.py                      # CPU, tiny models, the job's defaults (no flags)
    .venv/bin/python benchmarks/precompute.py --gpu                # SD-sized AutoencoderKL, 256 px, bf16

Both sides encode the same ingest-format shards with the same encoders (`PrecomputeEncoder`),
the same batch size and the same latent shard writer, and write the same output format:

- Ray: `pipelines.precompute`'s graph (CPU read/decode tasks -> encoder actor pool -> driver
  writer) on an embedded local Ray started before timing (Ray's own start-up is excluded; the
  encoder actors' process start, imports and model load are included, as a job pays them).
- Plain: a torch `DataLoader` (same decode/preprocess code in `--loader-workers` worker
  processes) feeding the encoder in the main process, writing tars as it goes. Model load is
  included too.

Reported: wall time and samples/s for each, plus the steady-state rate (first encoded batch to
the end), and the ratio Ray / plain. `--gpu` builds an SD-1/2-shaped AutoencoderKL (83 M params,
random weights, nothing downloaded) at 256 px in bf16 with the tiny text tower (text encoding is
a few % of the VAE cost), and samples `nvidia-smi` utilisation during the encode phase to
report the share of time the GPU was busy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pipelines  # noqa: E402,F401  (platform/ on sys.path when not installed)
import torch.utils.data as tud  # noqa: E402


def write_shards(out: Path, shards: int, per_shard: int, image_size: int, seed: int = 0) -> None:
    """Ingest-format shards of photo-like JPEGs (smooth gradients + noise), varied aspect ratios."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from latentforge import formats, storage
    from latentforge.manifest import Manifest, ShardRecord, write_manifest

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for shard in range(shards):
        path = out / f"{formats.shard_name(shard)}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for i in range(per_shard):
                key = formats.sample_key(shard, i)
                w = image_size + int(rng.integers(0, image_size // 2))
                h = image_size + int(rng.integers(0, image_size // 2))
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1)
                array = np.clip(base + rng.integers(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(array).save(buf, format="JPEG", quality=90)
                caption = f"a synthetic photo number {i} of shard {shard} with a gradient"
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption,
                            "json": {"key": key, "caption": caption, "width": w, "height": h}})
        records.append(ShardRecord(name=formats.shard_name(shard), samples=per_shard,
                                   sha256=storage.sha256_file(str(path))))
    write_manifest(str(out), Manifest(stage="ingest", config={"benchmark": True}, shards=records))


# ---------------------------------------------------------------------------------------------
# Plain loop
# ---------------------------------------------------------------------------------------------

class _ShardSamples(tud.IterableDataset):
    """IterableDataset over the shards: the same decode/preprocess as the pipeline's readers."""

    def __init__(self, config, shard_names: list[str]) -> None:
        self.config = config
        self.shard_names = shard_names

    def __iter__(self):
        from latentforge import storage
        from latentforge.precompute.preprocess import iter_ingest_shard, preprocess_sample

        info = tud.get_worker_info()
        names = self.shard_names if info is None else self.shard_names[info.id::info.num_workers]
        c = self.config
        for name in names:
            for sample in iter_ingest_shard(storage.join(c.input, f"{name}.tar")):
                status, image, record = preprocess_sample(sample, c.resolution, c.resize_filter, c.crop, c.seed,
                                                          c.keep_empty_captions)
                yield name, sample.key, status, record, image


def _collate(items):
    return items


def run_plain(config, shard_names: list[str], loader_workers: int, threads: int = 0) -> dict:
    import numpy as np
    import torch

    from latentforge.precompute.encode import PrecomputeEncoder
    from latentforge.precompute.writer import ShardWriter

    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    encoder = PrecomputeEncoder(config)
    blank = np.zeros((config.resolution, config.resolution, 3), dtype=np.uint8)
    loader = tud.DataLoader(_ShardSamples(config, shard_names), batch_size=config.batch_size,
                            num_workers=loader_workers, collate_fn=_collate,
                            persistent_workers=False, prefetch_factor=4 if loader_workers else None)
    writers: dict[str, ShardWriter] = {}
    first = None
    rows = 0
    for items in loader:
        batch = {
            "shard": np.array([i[0] for i in items]), "key": np.array([i[1] for i in items]),
            "status": np.array([i[2] for i in items]), "caption": np.array([i[3]["caption"] for i in items], dtype=object),
            "meta": np.array([json.dumps(i[3]) for i in items], dtype=object),
            "image": np.stack([i[4] if i[4] is not None else blank for i in items]),
        }
        out = encoder.encode_batch(batch)
        if first is None:
            first = time.perf_counter()
        for i in range(len(items)):
            shard = str(out["shard"][i])
            writer = writers.setdefault(shard, ShardWriter(config.output, shard, config.dtype))
            writer.add({k: out[k][i] for k in out})
        rows += len(items)
    for writer in writers.values():
        writer.finish()
    end = time.perf_counter()
    torch.set_num_threads(default_threads)
    return {"rows": rows, "wall_s": end - started, "steady_s": end - (first or end)}


# ---------------------------------------------------------------------------------------------
# Ray pipeline
# ---------------------------------------------------------------------------------------------

def run_ray(config, actors) -> dict:
    from pipelines.precompute import encode_shards
    from latentforge.precompute.stage import plan_run

    plan = plan_run(config)
    records: dict = {}
    marks: list[float] = []
    rows = [0]

    def on_rows(n: int) -> None:
        if not marks:
            marks.append(time.perf_counter())
        rows[0] += n

    started = time.perf_counter()
    counts = encode_shards(config, plan, records, lambda: None, actors, on_rows=on_rows)
    end = time.perf_counter()
    assert len(records) == len(plan.pending), "not every shard finished"
    return {"rows": counts["rows"], "wall_s": end - started, "steady_s": end - (marks[0] if marks else end)}


# ---------------------------------------------------------------------------------------------

class GpuSampler:
    """Samples `nvidia-smi` GPU utilisation every 0.2 s on a thread; `busy` = mean share."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]) / 100.0)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def busy(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def save_sd_autoencoder_kl(path: Path) -> str:
    """An SD-1/2-shaped AutoencoderKL (block_out_channels 128-256-512-512), random weights."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=4, sample_size=256,
                  scaling_factor=0.18215).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="SD-sized AutoencoderKL at 256 px in bf16 on CUDA")
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--samples-per-shard", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--vae-type", default="autoencoder_kl", choices=["autoencoder_kl", "patchify"])
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader workers of the plain loop")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="encoder actors (0 = the job's default; with --num-cpus-per-actor 0 too: its auto policy)")
    parser.add_argument("--num-cpus-per-actor", type=float, default=0.0,
                        help="CPU slots per encoder actor (its torch threads: max(1, int(this))); 0 = the job's default")
    parser.add_argument("--plain-threads", type=int, default=0,
                        help="torch threads of the plain loop (0 = torch's default, all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side; the median is reported")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)

    import ray
    import torch

    from latentforge.models.text_encoder import save_tiny_clip_checkpoint
    from tests.harness.tiny_models import save_tiny_autoencoder_kl
    from latentforge.precompute.config import PrecomputeConfig
    from pipelines.runtime import init_ray

    gpu = args.gpu
    if gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device here", file=sys.stderr)
        return 2
    shards = args.shards or (8 if gpu else 4)
    per_shard = args.samples_per_shard or (256 if gpu else 192)
    resolution = args.resolution or (256 if gpu else 64)
    batch = args.batch_size or (32 if gpu else 16)
    root = Path(tempfile.mkdtemp(prefix="lf-bench-precompute-"))
    try:
        write_shards(root / "ingest", shards, per_shard, image_size=resolution + resolution // 4)
        vae = (save_sd_autoencoder_kl(root / "vae") if gpu else save_tiny_autoencoder_kl(root / "vae"))
        clip = save_tiny_clip_checkpoint(root / "clip.safetensors")

        def config(out: str) -> PrecomputeConfig:
            return PrecomputeConfig(
                input=str(root / "ingest"), output=out, vae_type=args.vae_type,
                vae=vae if args.vae_type != "patchify" else "", text_encoder="lf-tiny-clip",
                text_encoder_weights=clip, text_layer="last", resolution=resolution, latent="mean",
                dtype="bf16" if gpu else "fp16", batch_size=batch, read_batch_size=batch,
                concurrency=args.concurrency, num_cpus_per_actor=args.num_cpus_per_actor, fidelity_samples=0,
                progress=False)

        where = init_ray()
        resources = ray.cluster_resources()
        actors = config("").encoder_actors(float(resources.get("CPU", 0)), float(resources.get("GPU", 0)))
        print(f"encoder actors: {actors.describe()}", flush=True)
        names = [f"{i:05d}" for i in range(shards)]
        results: dict[str, list[dict]] = {"ray": [], "plain": []}
        busy: list[float] = []
        for rep in range(args.repeats):
            for side in ("ray", "plain"):
                out = root / f"out-{side}-{rep}"
                with GpuSampler() if gpu else _Null() as sampler:
                    result = (run_ray(config(str(out)), actors) if side == "ray"
                              else run_plain(config(str(out)), names, args.loader_workers, args.plain_threads))
                if gpu and side == "ray" and sampler.busy is not None:
                    busy.append(sampler.busy)
                result["samples"] = shards * per_shard
                result["load_avg_1m"] = os.getloadavg()[0]  # other processes on the machine skew a run
                results[side].append(result)
                print(f"{side:5s} run {rep}: {result['samples']} samples in {result['wall_s']:.2f} s "
                      f"({result['samples'] / result['wall_s']:.1f}/s; steady {result['steady_s']:.2f} s; "
                      f"load {result['load_avg_1m']:.1f})", flush=True)
                shutil.rmtree(out, ignore_errors=True)

        def summary(side: str) -> dict:
            walls = [r["wall_s"] for r in results[side]]
            steadies = [r["steady_s"] for r in results[side]]
            n = shards * per_shard
            return {"wall_s_median": statistics.median(walls), "samples_per_s": n / statistics.median(walls),
                    "steady_samples_per_s": n / statistics.median(steadies), "runs": results[side]}

        report = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "torch": torch.__version__, "ray_version": ray.__version__, "device": "cuda" if gpu else "cpu",
            "ray_runs_on": where, "shards": shards, "samples": shards * per_shard, "resolution": resolution,
            "batch_size": batch, "vae_type": args.vae_type, "loader_workers": args.loader_workers,
            "flags": {"concurrency": args.concurrency, "num_cpus_per_actor": args.num_cpus_per_actor},
            "encoder_actors": dataclasses.asdict(actors),
            "plain_threads": args.plain_threads or torch.get_num_threads(), "load_avg": os.getloadavg(),
            "ray": summary("ray"), "plain": summary("plain"),
        }
        report["ratio_wall"] = report["ray"]["samples_per_s"] / report["plain"]["samples_per_s"]
        report["ratio_steady"] = report["ray"]["steady_samples_per_s"] / report["plain"]["steady_samples_per_s"]
        if gpu:
            report["gpu_busy_share"] = statistics.fmean(busy) if busy else None
        print(json.dumps({k: v for k, v in report.items() if k not in ("ray", "plain")}, indent=2))
        for side in ("ray", "plain"):
            s = report[side]
            print(f"{side:5s}: {s['samples_per_s']:.1f} samples/s end to end (median of {args.repeats}), "
                  f"{s['steady_samples_per_s']:.1f} samples/s steady state")
        print(f"ratio ray/plain: {report['ratio_wall']:.2f}x end to end, {report['ratio_steady']:.2f}x steady state")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _Null:
    busy = None

    def __enter__(self) -> "_Null":
        return self

    def __exit__(self, *exc) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main())
