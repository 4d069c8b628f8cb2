"""End to end through Ray: in-process on the session cluster, the job as a subprocess, signals,
kill -9 + resume, and one real `ray job submit --working-dir .`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from latentforge import manifest as mf, storage
from latentforge.ingest.config import IngestConfig
from tests.harness.http_server import realistic_jpeg_pool
from tests.harness.url_lists import laion_rows, pool_rows, write_rows

REPO = Path(__file__).resolve().parent.parent
JOB = str(REPO / "jobs" / "download_images.py")


def keys_in(out: Path) -> list[str]:
    manifest = mf.read_manifest(str(out), "ingest")
    keys: list[str] = []
    for shard in manifest.shards:
        assert storage.sha256_file(str(out / f"{shard.name}.tar")) == shard.sha256
        with tarfile.open(out / f"{shard.name}.tar") as tar:
            keys += [n.split(".")[0] for n in tar.getnames() if n.endswith(".jpg")]
    return sorted(keys)


def visible_leftovers(out: Path) -> list[str]:
    """Temp files a reader could mistake for output (hidden `.x.tmp-*` names are by design invisible)."""
    return [p.name for p in out.iterdir() if ".tmp-" in p.name and not p.name.startswith(".")]


@pytest.mark.slow
def test_laion_rows_in_process_with_mlflow(ray_session, tmp_path, http_server, laion_sample, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines import ingest

    http_server.set_pool(realistic_jpeg_pool(6))
    rows = laion_rows(laion_sample, http_server, 120)
    rows[7]["URL"] = http_server.route("/gone", status=410)
    rows[8]["URL"] = http_server.route("/bomb", kind="bomb")
    rows[9]["URL"] = http_server.route("/optout", kind="jpeg", headers={"X-Robots-Tag": "noimageai"})
    rows[10]["URL"] = "http://169.254.169.254/latest/meta-data/"
    write_rows(tmp_path / "laion.parquet", rows)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = IngestConfig(input=str(tmp_path / "laion.parquet"), output=str(tmp_path / "out"), url_col="URL",
                          caption_col="TEXT", samples_per_shard=50, allow_networks=["127.0.0.1/32"],
                          image_size=64, progress=False, threads_per_shard=8)
    result = ingest.run(config)
    counts = result.counts
    assert counts["rows"] == 120 and counts["ok"] == 116
    assert {k: counts[k] for k in ("http_4xx", "bomb", "opt_out", "ssrf_blocked")} == dict.fromkeys(
        ("http_4xx", "bomb", "opt_out", "ssrf_blocked"), 1)
    assert "LatentForge ingest" in result.summary and "success rate" in result.summary
    with tarfile.open(tmp_path / "out" / "00001.tar") as tar:
        meta = json.loads(tar.extractfile("000010003.json").read())
        caption = tar.extractfile("000010003.txt").read().decode("utf-8")
    assert caption == (rows[53]["TEXT"] or "") == meta["caption"]
    assert meta["ORIGINAL_URL"] == rows[53]["ORIGINAL_URL"] and meta["url"] == rows[53]["URL"]
    assert keys_in(tmp_path / "out") == sorted(f"{i // 50:05d}{i % 50:04d}" for i in range(120)
                                               if i not in (7, 8, 9, 10))
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.mlflow_run_id)
    assert run.data.metrics["count.ok"] == 116 and run.data.metrics["images_per_s"] > 0
    assert run.data.params["url_col"] == "URL" and run.data.tags["latentforge.stage"] == "ingest"


def _job(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, JOB, *args], env=env, cwd=kw.pop("cwd", REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for_shards(out: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= count:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise TimeoutError("no shard finished in time")


def _slow_input(tmp_path: Path, server, rows: int, delay: float) -> Path:
    for i in range(rows):
        server.image(f"/slow/{i}.jpg", delay_s=delay)
    return write_rows(tmp_path / "in.jsonl.gz", [{"url": server.url(f"/slow/{i}.jpg"), "caption": f"c{i}",
                                                  "n": i} for i in range(rows)])


def test_warm_up_tasks_run_on_ray_workers_and_are_bounded(ray_session, tmp_path) -> None:
    import ray

    from pipelines import ingest

    config = IngestConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"), mlflow=False,
                          progress=False, max_concurrent_shards=1)
    assert ingest._start_warming(config, shards=0) == []
    refs = ingest._start_warming(config, shards=3)
    assert len(refs) == 1  # never more than the shards that can run at once
    assert ray.get(refs, timeout=120) == [None]  # imported and built the shard parts without error


def _slow_job_args(src: Path, out: Path) -> list[str]:
    """The interrupted-run tests' command line: 4-sample shards, 2 threads, so a run takes a while."""
    return ["--input", str(src), "--output", str(out), "--samples-per-shard", "4", "--allow-private-network",
            "--threads-per-shard", "2", "--image-size", "32", "--no-mlflow", "--no-progress"]


@pytest.mark.slow
def test_job_subprocess_sigterm_then_resume(ray_head, tmp_path, http_server) -> None:
    src = _slow_input(tmp_path, http_server, 40, delay=0.25)
    out = tmp_path / "out"
    args = _slow_job_args(src, out)
    proc = _job(args, ray_head.env())
    _wait_for_shards(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, output
    assert "stopped by SIGTERM" in output
    assert visible_leftovers(out) == []
    partial = keys_in(out)  # every listed shard verifies
    assert 0 < len(partial) < 40

    done = subprocess.run([sys.executable, JOB, *args], env=ray_head.env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LatentForge ingest" in done.stdout and "ok" in done.stdout
    assert keys_in(out) == sorted(f"{i // 4:05d}{i % 4:04d}" for i in range(40))


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_exact_keys(ray_head, tmp_path, http_server) -> None:
    src = _slow_input(tmp_path, http_server, 48, delay=0.2)
    out = tmp_path / "out"
    args = _slow_job_args(src, out)
    proc = _job(args, ray_head.env(), start_new_session=True)
    _wait_for_shards(out, 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    listed = mf.read_manifest(str(out), "ingest")
    assert 2 <= len(listed.shards) < 12
    time.sleep(1.0)  # let the cluster reap the dead driver's workers
    http_server.reset_requests()
    done = subprocess.run([sys.executable, JOB, *args], env=ray_head.env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert keys_in(out) == sorted(f"{i // 4:05d}{i % 4:04d}" for i in range(48))  # no gaps, no duplicates
    refetched = {r.path for r in http_server.requests}
    finished_rows = {f"/slow/{int(s.name) * 4 + j}.jpg" for s in listed.shards for j in range(4)}
    assert not refetched & finished_rows, "finished shards were downloaded again"
    ledger_rows = sorted(r for s in mf.read_manifest(str(out), "ingest").shards
                         for r in pq.read_table(out / f"{s.name}.parquet")["row"].to_pylist())
    assert ledger_rows == list(range(48))


@pytest.mark.slow
def test_ray_job_submit(ray_head, tmp_path, http_server) -> None:
    http_server.set_pool(realistic_jpeg_pool(3))
    src = write_rows(tmp_path / "urls.csv", pool_rows(http_server, 30))
    out = tmp_path / "submitted"
    env = ray_head.env(RAY_AUTH_MODE="token")
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.dashboard_url,
           "--working-dir", ".", "--", "python", "jobs/download_images.py", "--input", str(src),
           "--output", str(out), "--samples-per-shard", "10", "--allow-private-network", "--image-size", "32",
           "--no-mlflow", "--no-progress"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "LatentForge ingest" in done.stdout
    assert keys_in(out) == sorted(f"{i // 10:05d}{i % 10:04d}" for i in range(30))
    assert not (out / "_input_index").exists(), "the run left its copy of the csv behind"
