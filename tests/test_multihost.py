"""Real multi-host: a head and two worker hosts in their own network namespaces (tests/harness/netns_cluster.py).

Every host's hostname resolves to 127.0.1.1, as on a fresh Debian/Ubuntu machine, and nothing here
sets GLOO_SOCKET_IFNAME: the training run forms its process group across hosts only because the
platform pins each worker's gloo socket to the interface that holds its node's Ray address.
Jobs go in through `ray job submit` run on the head, the way a user submits them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.netns_cluster import DASHBOARD_PORT, NetnsCluster, unavailable_reason
from tests.harness.ray_head import VENV_BIN

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    if reason := unavailable_reason():
        pytest.skip(f"multi-host harness unavailable: {reason}")
    cluster = NetnsCluster().start(workers=2)
    sys.path[:0] = [str(REPO / "platform")]
    from tests.harness.latent_shards import write_latent_dataset

    write_latent_dataset(cluster.shared / "latents", shard_sizes=[16, 16], width=16)
    yield cluster
    cluster.stop()


def submit(cluster: NetnsCluster, job_args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`ray job submit` on the head; the entrypoint runs on the head (resource "head"), which holds no CPU."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cluster.shared / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    cmd = [f"{VENV_BIN}/ray", "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}",
           "--entrypoint-resources", '{"head": 1}', "--runtime-env-json", json.dumps({"env_vars": env}), "--",
           f"{VENV_BIN}/python", *job_args]
    return cluster.run("head", cmd, timeout=timeout)


def train_args(data: Path, storage: Path, run_name: str, *extra: str) -> list[str]:
    return [str(REPO / "jobs" / "train.py"), "--preset", "tiny", "--data", str(data), "--steps", str(STEPS),
            "--batch-size", "4", "--lr", "2e-3", "--num-workers", "2", "--placement-strategy", "SPREAD",
            "--storage-path", str(storage), "--run-name", run_name, "--checkpoint-every", "2", "--eval-every", "0",
            "--log-every", "1", "--trace-dir", str(storage / "trace" / run_name), *extra]


def final_weights(trace_dir: Path, rank: int) -> str:
    events = [json.loads(x) for x in (trace_dir / f"trace_rank{rank}.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "final"][-1]["weights_sha256"]


def test_ray_sees_three_hosts_with_their_own_addresses(cluster) -> None:
    expected = sorted(h.address for h in cluster.hosts.values())
    assert len(set(expected)) == 3
    assert cluster.alive_nodes() == expected
    resolved = cluster.run("host1", ["python3", "-c", "import socket; print(socket.gethostbyname(socket.gethostname()))"],
                           timeout=30).stdout.strip()
    assert resolved == "127.0.1.1"  # the trap the platform must not fall into


def test_spread_training_across_hosts_pins_gloo_to_each_nodes_interface(cluster, tmp_path) -> None:
    storage = cluster.shared / "runs"
    proc = submit(cluster, train_args(cluster.shared / "latents", storage, "spread", "--storage-is-shared"))
    assert proc.returncode == 0, proc.stdout[-6000:]
    pinned = dict(re.findall(r"process-group socket on node (10\.77\.\d+\.\d+): GLOO_SOCKET_IFNAME=(\w+) \(set\)",
                             proc.stdout))
    workers = sorted(cluster.hosts[h].address for h in ("host1", "host2"))
    assert sorted(pinned) == workers, proc.stdout[-4000:]  # two workers, on the two worker hosts' addresses
    assert set(pinned.values()) == {"eth0"}  # the interface holding each node's Ray address
    export = json.loads((storage / "spread" / "export" / "manifest.json").read_text())
    assert export["extra"]["step"] == STEPS
    trace = storage / "trace" / "spread"
    assert final_weights(trace, 0) == final_weights(trace, 1)

    # The same run on one host (an embedded 2-CPU Ray, 2 workers) ends with the same weights.
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "platform")]))
    env.pop("RAY_ADDRESS", None)
    single = subprocess.run([sys.executable, *train_args(cluster.shared / "latents", tmp_path / "runs", "single")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, (single.stdout + single.stderr)[-4000:]
    assert final_weights(tmp_path / "runs" / "trace" / "single", 0) == final_weights(trace, 0)
