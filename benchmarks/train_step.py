"""Train-step throughput: jobs/train.py vs a bare Accelerate loop, and 2 workers vs 1.

    python benchmarks/train_step.py                      # CPU: tiny preset, simulated 2-node cluster
    python benchmarks/train_step.py --gpu-mfu            # GPU: sd2-base at 256 px (32x32 latents), bf16, MFU

CPU part (all runs use one CPU thread per worker, as Ray Train workers do):
  bare      a hand-written Accelerate loop as in diffusers' train_text_to_image.py --use_ema: same
            UNet, batch, objective (min-SNR), fused AdamW, grad clipping and EMA (diffusers
            EMAModel, decay 0.999); batches pre-collated in memory; no NaN guard, LR schedule,
            caption dropout or logging (those count as the job's overhead)
  trainer   `DiffusionTrainer.train_step` on the same in-memory batches (adds EMA, the non-finite
            guard, grad-norm clipping, LR schedule)
  job x1    `jobs/train.py` with 1 worker on a `ray.cluster_utils.Cluster` of 2 nodes x 1 CPU:
            Ray Train + Ray Data streaming from latent shards + prefetch thread + MLflow logging
  job x2    the same with 2 workers SPREAD over the 2 nodes (DDP over gloo; global batch doubles)
Steady state excludes the first --warmup steps (Ray Data's start-up in the worker; reported
separately as the first step's time); the default 120 steps over 960 samples are two epochs, so
the measured window includes an epoch boundary (a new Ray Data execution). samples/s is measured
between step ends (so logging and tracing count); the data-wait share is time blocked on the
batch queue / step time.

GPU part (--gpu-mfu): sd2-base-shaped UNet, batch --gpu-batch of 4x32x32 latents and 77x1024
text states, bf16 autocast, fused AdamW; MFU = achieved model FLOP/s (forward+backward counted
by torch.utils.flop_counter) / --peak-tflops (H100 SXM dense bf16: 989).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "platform")]


def _data(root: Path, samples: int, latent_size: int, width: int):
    from tests.harness.latent_shards import write_latent_dataset

    shards = [64] * (samples // 64) + ([samples % 64] if samples % 64 else [])
    return write_latent_dataset(root / "latents", shard_sizes=shards, latent_size=latent_size, width=width,
                                context_length=32)


def _batches(info, batch_size: int, count: int):
    from latentforge.training import data as tdata

    plan = tdata.plan_data(info.manifest, 1, batch_size, 256, 0)
    rows = tdata.read_positions(str(info.dir), plan, range(batch_size * count))
    samples = [tdata.decode_row(r, "fp32") for r in rows]
    return [tdata.collate(samples[i:i + batch_size], 1) for i in range(0, len(samples), batch_size)]


def bare_loop(info, args) -> float:
    """Samples/s of a minimal Accelerate loop on in-memory batches."""
    import torch
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from latentforge.diffusion import objective
    from latentforge.diffusion.schedulers import make_scheduler
    from latentforge.models.unet import build_unet

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_unet("tiny", 4, args.width, args.latent_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model, opt = acc.prepare(model, opt)
    ema = EMAModel(acc.unwrap_model(model).parameters(), decay=0.999)
    sched = make_scheduler()
    gen = torch.Generator().manual_seed(0)
    batches = _batches(info, args.batch_size, 8)
    times = []
    for i in range(args.steps):
        b = batches[i % len(batches)]
        start = time.perf_counter()
        latents = b["latents"]
        noise = objective.sample_noise(latents, gen)
        t = objective.sample_timesteps(latents.shape[0], 1000, gen)
        pred = model(sched.add_noise(latents, noise, t), t, encoder_hidden_states=b["text"],
                     encoder_attention_mask=b["mask"]).sample
        w = objective.min_snr_weights(objective.snr(sched, t), 5.0, "epsilon")
        loss = objective.weighted_mse(pred, noise, w)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.step(acc.unwrap_model(model).parameters())
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    steady = times[args.warmup:]
    return args.batch_size * len(steady) / sum(steady)


def trainer_loop(info, args) -> float:
    from accelerate import Accelerator

    from latentforge.models.unet import resolve_unet_config
    from latentforge.training import data as tdata
    from latentforge.training.config import TrainConfig
    from latentforge.training.loop import DiffusionTrainer

    config = TrainConfig(data=str(info.dir), steps=args.steps, batch_size=args.batch_size, lr=1e-3, ema_decay=0.999,
                         snr_gamma=5.0, warmup_steps=10)
    trainer = DiffusionTrainer(config, resolve_unet_config("tiny", 4, args.width, args.latent_size),
                               Accelerator(cpu=True), tdata.read_empty_caption(str(info.dir), info.manifest))
    batches = _batches(info, args.batch_size, 8)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        trainer.train_step([batches[i % len(batches)]])
        times.append(time.perf_counter() - start)
    steady = times[args.warmup:]
    return args.batch_size * len(steady) / sum(steady)


def job_run(work: Path, info, args, workers: int, repeat: int = 0) -> dict:
    """`python jobs/train.py ...` as a user runs it, attached to the cluster through RAY_ADDRESS."""
    name = f"bench-x{workers}-r{repeat}"
    argv = ["--preset", "tiny", "--data", str(info.dir), "--steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--num-workers", str(workers), "--placement-strategy", "SPREAD",
            "--storage-path", str(work / "runs"), "--run-name", name, "--checkpoint-every", str(10 * args.steps),
            "--log-every", str(args.steps), "--trace-dir", str(work / "trace" / name), "--eval-every", "0"]
    start = time.time()
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), *argv], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"jobs/train.py exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    events = [json.loads(x) for x in (work / "trace" / name / "trace_rank0.jsonl").read_text().splitlines()]
    all_steps = [e for e in events if e["event"] == "step"]
    steps = all_steps[args.warmup:]
    span = steps[-1]["t"] - steps[0]["t"]
    epochs = sorted({e["epoch"] for e in steps})
    return {"samples_per_s": (len(steps) - 1) * args.batch_size * workers / span,
            "data_wait_share": sum(e["wait"] for e in steps[1:]) / span,
            "first_step_s": all_steps[0]["step_time"], "epochs_in_window": epochs,
            "median_step_s": sorted(e["step_time"] for e in steps)[len(steps) // 2],
            "wall_s_including_ray_start": wall}


def loop_in_fresh_process(kind: str, info, args) -> float:
    """Samples/s of the `kind` in-memory loop, run in a new interpreter that never imports Ray."""
    cmd = [sys.executable, __file__, "--loop", kind, "--data-dir", str(info.dir), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--latent-size",
           str(args.latent_size), "--width", str(args.width)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} loop exited {done.returncode}:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def run_loop(args) -> None:
    """The child side of `loop_in_fresh_process`: prints the loop's samples/s."""
    import types

    import torch

    from latentforge.manifest import read_manifest

    torch.set_num_threads(1)
    info = types.SimpleNamespace(dir=Path(args.data_dir), manifest=read_manifest(args.data_dir, "precompute"))
    print((bare_loop if args.loop == "bare" else trainer_loop)(info, args))


def cpu_benchmark(args) -> dict:
    """--repeats rounds of bare, trainer, job x1 and job x2, interleaved; the ratios use medians.

    On 2 shared cores single runs of this size vary by +-5 %, more than the overhead being
    measured, hence the repeats. The simulated cluster is up (idle) during the bare and trainer
    loops too, so every run sees the same machine. Every run is a process of its own: the loops
    run in interpreters that never import Ray (a connected Ray driver's threads in the same
    process slow a loop down), and the jobs run as `python jobs/train.py`, as users run them.
    """
    import statistics

    from tests.harness.ray_head import start_simulated_cluster

    work = Path(tempfile.mkdtemp(prefix="lf-bench-train-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    info = _data(work, args.samples, args.latent_size, args.width)
    runs: dict = {"bare": [], "trainer": [], "job_x1": [], "job_x2": []}
    cluster = start_simulated_cluster(num_nodes=2, cpus_per_node=1)
    try:
        for r in range(args.repeats):
            runs["bare"].append(loop_in_fresh_process("bare", info, args))
            runs["trainer"].append(loop_in_fresh_process("trainer", info, args))
            runs["job_x1"].append(job_run(work, info, args, 1, r))
            runs["job_x2"].append(job_run(work, info, args, 2, r))
            print(f"round {r + 1}: bare {runs['bare'][-1]:.1f}, trainer {runs['trainer'][-1]:.1f}, job x1 "
                  f"{runs['job_x1'][-1]['samples_per_s']:.1f}, job x2 {runs['job_x2'][-1]['samples_per_s']:.1f} "
                  "samples/s", flush=True)
    finally:
        cluster.shutdown()
    median = {k: statistics.median(v if k in ("bare", "trainer") else [x["samples_per_s"] for x in v])
              for k, v in runs.items()}
    paired = [1 - job["samples_per_s"] / bare for job, bare in zip(runs["job_x1"], runs["bare"])]
    return {"runs": runs, "median_samples_per_s": median,
            "overhead_per_round": paired, "median_overhead_per_round": statistics.median(paired),
            "overhead_vs_bare": 1 - median["job_x1"] / median["bare"],
            "overhead_vs_trainer": 1 - median["job_x1"] / median["trainer"],
            "speedup_2_workers": median["job_x2"] / median["job_x1"]}


def gpu_mfu(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentforge.diffusion import objective
    from latentforge.diffusion.schedulers import make_scheduler
    from latentforge.models.unet import build_unet

    if not torch.cuda.is_available():
        raise SystemExit("--gpu-mfu needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = build_unet("sd2-base", 4, 1024, 32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    sched = make_scheduler(prediction_type="v_prediction")
    b = args.gpu_batch
    gen = torch.Generator(device).manual_seed(0)
    latents = torch.randn(b, 4, 32, 32, device=device)
    text = torch.randn(b, 77, 1024, device=device)

    def step():
        noise = objective.sample_noise(latents, gen)
        t = objective.sample_timesteps(b, 1000, gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        loss = objective.weighted_mse(pred, objective.training_target(sched, latents, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    return {"gpu": torch.cuda.get_device_name(), "batch": b, "samples_per_s": b / seconds,
            "tflops_per_step": flops / 1e12, "mfu": flops / seconds / (args.peak_tflops * 1e12),
            "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--samples", type=int, default=960)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (CPU part)")
    parser.add_argument("--gpu-mfu", action="store_true", help="sd2-base 256 px bf16 samples/s and MFU on a GPU")
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--loop", choices=["bare", "trainer"], help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        run_loop(args)
        return
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
               "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "args": vars(args)}
    results.update(gpu_mfu(args) if args.gpu_mfu else cpu_benchmark(args))
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
