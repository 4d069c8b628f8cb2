"""Ingest throughput vs img2dataset, and peak memory at 10k vs 100k rows.

    .venv/bin/python benchmarks/ingest_vs_img2dataset.py [--rows 5000] [--repeats 3] [--processes 2]
        [--threads 64] [--ours-parallelism defaults|matched] [--ray embedded|cluster|both]
        [--rss-rows 10000,100000] [--skip-rss] [--skip-speed] [--json out.json]

Both tools download the same URL list from the same threaded loopback server (a pool of
photo-like JPEGs of ~10-120 KB, median ~50 KB), resize to the same size and mode, write
WebDataset tars. img2dataset runs with `--processes` processes of `--threads` download threads;
our job by default with no parallelism flags at all (it sizes itself to the machine), or with
`--ours-parallelism matched` with the same processes and threads as img2dataset.
Each run is a fresh subprocess timed end to end (interpreter start, Ray/multiprocessing start-up,
downloads, writing), because that is what a user waits for; the ingest job's own in-stage rate
(from its summary) is reported beside it. Runs alternate (ours, theirs, ours, ...) so machine
noise hits both; the reported number is the median of `--repeats`.

`--ray` says how our job meets Ray: `embedded` (no RAY_ADDRESS: the job starts and stops its
own local Ray inside the timed run, as a new user's first run does) or `cluster` (a
`ray start --head` cluster with the same CPU count is started once, untimed, and the job
attaches through RAY_ADDRESS, as `ray job submit` on a running cluster does). Each mode is a
phase of its own with its own img2dataset runs, so both tools see the same machine state
(in `cluster` the head's idle daemons run during img2dataset's runs too).

Peak RSS: the summed resident memory of the job's whole process tree (driver, embedded Ray's
GCS/raylet and workers), sampled every 0.2 s, for a 10k- and a 100k-row input of small images
served from a pool (the memory question is about rows, not pixels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness.http_server import LoopbackServer, jpeg_bytes, realistic_jpeg_pool  # noqa: E402
from tests.harness.ray_head import RayHead  # noqa: E402
from tests.harness.url_lists import pool_rows, write_rows  # noqa: E402
from latentforge.manifest import MANIFEST_NAME  # noqa: E402

PY = sys.executable


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak summed RSS of the process tree, output) of one subprocess."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    out_chunks: list[str] = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(ps))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=10)
    wall = time.monotonic() - started
    output = "".join(out_chunks)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}:\n{output[-4000:]}")
    return wall, peak, output


def count_tar_images(out: Path, ext: str = ".jpg") -> int:
    import tarfile

    n = 0
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            n += sum(1 for m in tar.getmembers() if m.name.endswith(ext))
    return n


def ours_cmd(src: Path, out: Path, a: argparse.Namespace, image_size: int) -> list[str]:
    cmd = [PY, "jobs/download_images.py", "--input", str(src), "--output", str(out),
           "--samples-per-shard", str(a.samples_per_shard), "--image-size", str(image_size),
           "--resize-mode", a.resize_mode, "--allow-private-network", "--no-mlflow", "--no-progress",
           "--retries", "0", "--timeout-s", "10"]
    if a.ours_parallelism == "matched":
        cmd += ["--num-cpus", str(a.processes), "--threads-per-shard", str(a.threads), "--max-per-host", str(a.threads)]
    return cmd


def theirs_cmd(src: Path, out: Path, a: argparse.Namespace, image_size: int) -> list[str]:
    code = (
        "from img2dataset import download\n"
        f"download(url_list={str(src)!r}, input_format='parquet', url_col='url', caption_col='caption',"
        f" output_format='webdataset', output_folder={str(out)!r}, processes_count={a.processes},"
        f" thread_count={a.threads}, image_size={image_size}, resize_mode={a.resize_mode!r},"
        f" number_sample_per_shard={a.samples_per_shard}, timeout=10, retries=0, enable_wandb=False,"
        f" distributor='multiprocessing', disallowed_header_directives=[], compute_hash='sha256')\n"
    )
    return [PY, "-c", code]


def in_stage_rate(output: str) -> float | None:
    match = re.search(r"images/s \(this run\)\s+([\d,.]+) img/s", output)
    return float(match.group(1).replace(",", "")) if match else None


@contextlib.contextmanager
def ray_for_ours(mode: str, env: dict[str, str], cpus: int) -> Iterator[dict[str, str]]:
    """The environment our job runs with: no RAY_ADDRESS, or attached to a fresh `cpus`-CPU head."""
    if mode == "embedded":
        yield env
        return
    temp_dir = Path(tempfile.mkdtemp(prefix="lfb-ray-", dir="/tmp"))  # short: AF_UNIX path limit
    head = RayHead(temp_dir=temp_dir, num_cpus=cpus).start()
    try:
        yield {**env, **head.env()}
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def speed_phase(a: argparse.Namespace, work: Path, src: Path, env: dict[str, str], mode: str) -> dict:
    """Alternating runs of both tools; our job meets Ray as `mode` says."""
    results: dict[str, list[dict]] = {"latentforge": [], "img2dataset": []}
    with ray_for_ours(mode, env, a.processes) as ours_env:
        for rep in range(a.repeats):
            for tool, make, run_env in (("latentforge", ours_cmd, ours_env), ("img2dataset", theirs_cmd, env)):
                out = work / f"{tool}-{rep}"
                shutil.rmtree(out, ignore_errors=True)
                load = os.getloadavg()[0]
                wall, peak, output = run_measured(make(src, out, a, a.image_size), run_env)
                images = count_tar_images(out)
                rec = {"wall_s": round(wall, 2), "images": images, "images_per_s": round(images / wall, 1),
                       "load_avg_1m_at_start": round(load, 1),
                       "peak_rss_mib": round(peak / 2 ** 20), "in_stage_images_per_s": in_stage_rate(output)}
                results[tool].append(rec)
                print(f"[speed:{mode}] {tool} run {rep + 1}: {rec}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    summary: dict = {}
    for tool, recs in results.items():
        summary[tool] = {"median_images_per_s": statistics.median(r["images_per_s"] for r in recs),
                         "median_wall_s": statistics.median(r["wall_s"] for r in recs), "runs": recs}
    ours, theirs = summary["latentforge"]["median_images_per_s"], summary["img2dataset"]["median_images_per_s"]
    summary["ratio"] = round(ours / theirs, 3) if theirs else None
    return summary


def speed(a: argparse.Namespace, work: Path, env: dict[str, str]) -> dict:
    server = LoopbackServer().start()
    try:
        pool = realistic_jpeg_pool(32)
        server.set_pool(pool)
        src = write_rows(work / "urls.parquet", pool_rows(server, a.rows))
        modes = ["embedded", "cluster"] if a.ray == "both" else [a.ray]
        report: dict = {mode: speed_phase(a, work, src, env, mode) for mode in modes}
        report["mean_jpeg_kib"] = round(sum(len(p) for p in pool) / len(pool) / 1024, 1)
        report["src_rows"] = a.rows
        report["server_connections"] = server.connections
        return report
    finally:
        server.stop()


def rss(a: argparse.Namespace, work: Path, env: dict[str, str]) -> dict:
    server = LoopbackServer().start()
    try:
        server.set_pool([jpeg_bytes(64, 48, seed=i, quality=80) for i in range(16)])
        out_rows = {}
        for rows in a.rss_rows:
            src = write_rows(work / f"rss-{rows}.parquet", pool_rows(server, rows))
            out = work / f"rss-out-{rows}"
            shutil.rmtree(out, ignore_errors=True)
            wall, peak, output = run_measured(ours_cmd(src, out, a, 64), env)
            manifest = json.loads((out / MANIFEST_NAME).read_text())
            out_rows[rows] = {"peak_rss_mib": round(peak / 2 ** 20), "wall_s": round(wall, 1),
                              "ok": manifest["counts"].get("ok", 0), "in_stage_images_per_s": in_stage_rate(output)}
            print(f"[rss] {rows} rows: {out_rows[rows]}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        small, large = min(a.rss_rows), max(a.rss_rows)
        growth = out_rows[large]["peak_rss_mib"] / out_rows[small]["peak_rss_mib"] - 1
        return {"runs": out_rows, "growth": round(growth, 3)}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-mode", default="border")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--ours-parallelism", choices=["defaults", "matched"], default="defaults",
                        help="defaults: our job with no parallelism flags, as a new user runs it; matched: "
                             "--num-cpus/--threads-per-shard/--max-per-host set to img2dataset's processes and threads")
    parser.add_argument("--ray", choices=["embedded", "cluster", "both"], default="embedded",
                        help="how our job meets Ray (see the module docstring)")
    parser.add_argument("--rss-rows", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here too")
    a = parser.parse_args()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("RAY_ADDRESS", None)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": {
        "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
        "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}, "args": vars(a)}
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        work = Path(tmp)
        if not a.skip_speed:
            report["speed"] = speed(a, work, env)
        if not a.skip_rss:
            report["rss"] = rss(a, work, env)
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
