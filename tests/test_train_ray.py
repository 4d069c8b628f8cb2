"""Training on a simulated two-node Ray cluster (ray.cluster_utils.Cluster, 2 nodes x 1 CPU).

One subprocess (this file run as a script) starts the cluster and runs jobs/train.py three times
with RAY_ADDRESS pointing at it; the test then checks the traces, checkpoints, export and MLflow:

  A  uninterrupted: 2 workers SPREAD over the 2 nodes, uneven shards (30 + 10 samples), 6 steps
     crossing an epoch boundary -> identical weights on both ranks, no hang
  B  same settings, but worker rank 1 is SIGKILLed (by the test, pid from its trace) right after
     step 4 (checkpoint at step 3):
     FailureConfig restarts the group from step 3; steps 4-6 reproduce A bit for bit, no sample
     is seen twice in the epoch, and it is all one MLflow run
  C  rerun of B's run name with --steps 8: resumes from B's last checkpoint (step 6), same MLflow run

Running the cluster in a fresh process keeps it away from any Ray driver the test session has.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = 6


def _args(work: Path, run_name: str, steps: int = STEPS) -> list[str]:
    return ["--preset", "tiny", "--data", str(work / "latents"), "--steps", str(steps), "--batch-size", "4",
            "--lr", "2e-3", "--num-workers", "2", "--placement-strategy", "SPREAD", "--storage-path",
            str(work / "runs"), "--run-name", run_name, "--checkpoint-every", "3", "--eval-every", "3",
            "--val-samples", "4", "--shuffle-buffer", "8", "--cfg-dropout", "0.2", "--log-every", "1",
            "--max-failures", "1", "--trace-dir", str(work / "trace" / run_name)]


def _kill_worker_after_step(trace: Path, step: int, marker: Path, done: threading.Event) -> None:
    """The fault of run B, from outside: SIGKILL the worker writing `trace` once it has logged `step`.

    The worker's pid is in its trace's "start" event. Ray Train registers a reported checkpoint
    on its health-check poll, which the subprocess runs every 0.1 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S),
    so the checkpoint of step 3 is registered by the time step 4 is logged.
    """
    while not done.is_set():
        lines = trace.read_text().split("\n")[:-1] if trace.exists() else []  # whole lines only
        events = [json.loads(line) for line in lines]
        if any(e["event"] == "step" and e["step"] == step for e in events):
            os.kill([e["pid"] for e in events if e["event"] == "start"][-1], signal.SIGKILL)
            marker.touch()
            return
        time.sleep(0.01)


def _cluster_main(work: Path) -> None:
    """Subprocess body: the cluster and the three training runs."""
    sys.path[:0] = [str(REPO), str(REPO / "platform")]
    from tests.harness.latent_shards import write_latent_dataset

    write_latent_dataset(work / "latents", shard_sizes=[30, 10], width=32, latent="mean_std")
    import ray

    from tests.harness.ray_head import start_simulated_cluster

    cluster = start_simulated_cluster(num_nodes=2, cpus_per_node=1)
    from jobs.train import main

    codes = {"A": main(_args(work, "A"))}
    done = threading.Event()
    killer = threading.Thread(target=_kill_worker_after_step, args=(work / "trace" / "B" / "trace_rank1.jsonl", 4,
                                                                   work / "killed_once", done), daemon=True)
    killer.start()
    codes["B"] = main(_args(work, "B"))
    done.set()
    killer.join()
    codes["C"] = main(_args(work, "B", steps=8))
    (work / "codes.json").write_text(json.dumps(codes))
    ray.shutdown()
    cluster.shutdown()


def _trace(work: Path, run: str, rank: int) -> list[dict]:
    return [json.loads(line) for line in (work / "trace" / run / f"trace_rank{rank}.jsonl").read_text().splitlines()]


def _attempts(events: list[dict]) -> list[list[dict]]:
    out: list[list[dict]] = []
    for e in events:
        if e["event"] == "start":
            out.append([])
        out[-1].append(e)
    return out


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("train_cluster")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", RAY_USAGE_STATS_ENABLED="0",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "platform")]))
    env.pop("RAY_ADDRESS", None)
    env.pop("LATENTFORGE_PIPELINE_RUN_ID", None)
    proc = subprocess.run([sys.executable, __file__, str(work)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=540)
    (work / "output.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    codes = json.loads((work / "codes.json").read_text())
    assert codes == {"A": 0, "B": 0, "C": 0}, (proc.stdout + proc.stderr)[-6000:]
    return work


@pytest.mark.slow
def test_two_nodes_identical_weights_and_uneven_shards_do_not_hang(cluster_runs) -> None:
    work = cluster_runs
    finals = [[e for e in _trace(work, "A", r) if e["event"] == "final"][-1] for r in (0, 1)]
    assert finals[0]["step"] == finals[1]["step"] == STEPS
    assert finals[0]["weights_sha256"] == finals[1]["weights_sha256"]
    assert finals[0]["ema_sha256"] == finals[1]["ema_sha256"]
    steps = [[e for e in _trace(work, "A", r) if e["event"] == "step"] for r in (0, 1)]
    assert [len(s) for s in steps] == [STEPS, STEPS]  # equal steps on both ranks despite 30 + 10 shards
    assert {e["epoch"] for e in steps[0]} == {0, 1}  # crossed an epoch boundary
    keys0 = {k for e in steps[0] if e["epoch"] == 0 for k in e["keys"]}
    keys1 = {k for e in steps[1] if e["epoch"] == 0 for k in e["keys"]}
    assert not keys0 & keys1  # the ranks read disjoint samples
    out = (work / "output.txt").read_text()
    assert "ETA" in out and "samples/s" in out  # progress on rank 0


@pytest.mark.slow
def test_killed_worker_resumes_exactly_in_the_same_mlflow_run(cluster_runs) -> None:
    work = cluster_runs
    assert (work / "killed_once").exists()
    for rank in (0, 1):
        reference = {e["step"]: e for e in _trace(work, "A", rank) if e["event"] == "step"}
        attempts = _attempts(_trace(work, "B", rank))
        assert len(attempts) == 3  # killed attempt, FailureConfig restart, rerun C
        first, restart, rerun = attempts
        assert first[0]["resumed_from"] is None and restart[0]["resumed_from"] == 3 and rerun[0]["resumed_from"] == 6
        restarted = [e for e in restart if e["event"] == "step"]
        assert [e["step"] for e in restarted] == [4, 5, 6]
        for e in restarted:  # bit-identical loss and identical batch to the uninterrupted run
            assert e["loss"] == reference[e["step"]]["loss"] and e["keys"] == reference[e["step"]]["keys"]
        epoch0 = [k for e in first if e["event"] == "step" and e["step"] <= 3 for k in e["keys"]]
        epoch0 += [k for e in restarted if e["epoch"] == 0 for k in e["keys"]]
        assert len(epoch0) == len(set(epoch0)) == 4 * 4  # 4 steps x 4 samples, none twice
        assert [e["step"] for e in rerun if e["event"] == "step"] == [7, 8]
    final_a = [e for e in _trace(work, "A", 0) if e["event"] == "final"][-1]
    final_b = [e for e in _attempts(_trace(work, "B", 0))[1] if e["event"] == "final"][-1]
    assert final_b["weights_sha256"] == final_a["weights_sha256"]

    export = json.loads((work / "runs" / "B" / "export" / "manifest.json").read_text())
    run_state = json.loads((work / "runs" / "B" / "latentforge_run.json").read_text())
    assert export["stage"] == "train" and export["extra"]["step"] == 8
    assert export["extra"]["mlflow_run_id"] == run_state["mlflow_run_id"]
    assert export["extra"]["data_dir"] == str(work / "latents")
    for part in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "data_manifest.json"):
        assert (work / "runs" / "B" / "export" / part).exists(), part
    checkpoints = sorted(p for p in (work / "runs" / "B").iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert 1 <= len(checkpoints) <= 3  # keep_checkpoints (tiny preset: 2) + Ray's in-flight one at most
    for ckpt in checkpoints:
        assert all(f.suffix in (".json", ".safetensors") for f in ckpt.iterdir())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentforge")
    runs_b = client.search_runs([experiment.experiment_id], "attributes.run_name = 'B'")
    assert len(runs_b) == 1 and runs_b[0].info.run_id == run_state["mlflow_run_id"]
    run = runs_b[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["latentforge.export_uri"] == str(work / "runs" / "B" / "export")
    loss_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert loss_steps == list(range(1, 9))
    for name in ("lr", "grad_norm", "samples_per_s", "step_time_s", "data_wait_share", "memory_gb", "val/loss"):
        assert client.get_metric_history(run.info.run_id, name), name
    assert run.data.params["steps"] in ("6", "8") and "derived.global_batch" in run.data.params
    assert len(client.search_runs([experiment.experiment_id], "attributes.run_name = 'A'")) == 1


if __name__ == "__main__":
    _cluster_main(Path(sys.argv[1]))
