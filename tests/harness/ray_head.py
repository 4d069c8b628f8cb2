"""A real local Ray cluster started with `ray start --head` on 127.0.0.1, on private ports.

Every port is chosen free so several test sessions on one machine never collide, and the
head runs with `--block` in its own process group so teardown stops exactly this cluster
(`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


WORKER_PORTS = 200


def worker_port_range(taken: set[int]) -> int:
    """Start of a worker-port range that overlaps none of the head's own ports (ray start refuses that)."""
    while True:
        low = free_port() // 10 * 10
        if not any(low <= port <= low + WORKER_PORTS for port in taken):
            return low


def venv_env(**extra: str) -> dict[str, str]:
    """The test's environment with this venv first on PATH (job entrypoints run `python`)."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray 2.60's `ray start --head` turns token auth on; clients (drivers, `ray job submit`) then read
    # the token only when told to. The session's own token file (RAY_AUTH_TOKEN_PATH) is set by
    # tests/harness/isolation.py and inherited from os.environ.
    env.setdefault("RAY_AUTH_MODE", "token")
    env.update(extra)
    return env


@dataclass
class RayHead:
    temp_dir: Path
    num_cpus: int = 2
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that should use this cluster (jobs, `ray job submit`)."""
        return venv_env(RAY_ADDRESS=self.address, RAY_API_SERVER_ADDRESS=self.dashboard_url, **extra)

    def start(self, timeout_s: float = 120) -> "RayHead":
        ports = {flag: free_port() for flag in (
            "--ray-client-server-port", "--node-manager-port", "--object-manager-port", "--metrics-export-port",
            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")}
        worker_lo = worker_port_range({self.port, self.dashboard_port, *ports.values()})
        cmd = [
            f"{VENV_BIN}/ray", "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--temp-dir", str(self.temp_dir), "--num-cpus", str(self.num_cpus),
            "--port", str(self.port), "--dashboard-port", str(self.dashboard_port),
            *(item for flag, port in ports.items() for item in (flag, str(port))),
            "--min-worker-port", str(worker_lo), "--max-worker-port", str(worker_lo + WORKER_PORTS),
        ]
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.temp_dir / "ray_start.log", "wb")
        # No drain on SIGTERM (Ray's default waits up to 30 s for drain-aware components such as Serve;
        # a test cluster has none, and its teardown would sit out the whole wait).
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=venv_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"))
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.temp_dir / 'ray_start.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer (401 under Ray's token auth) means the dashboard is up
            except OSError:
                time.sleep(0.5)
        self.stop()  # never leak a half-started head
        raise TimeoutError(f"Ray head not ready in {timeout_s}s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGTERM to `ray start` alone: it drains its node through the GCS and stops its children.
        # Sent to the whole group, the GCS dies first and the drain waits 60 s for it.
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group outlived the shutdown
        self.process.wait(timeout=30)


def start_simulated_cluster(num_nodes: int = 2, cpus_per_node: int = 1, distinct_ips: bool = False) -> Any:
    """A `ray.cluster_utils.Cluster` of `num_nodes` nodes on this machine, for multi-node tests.

    With `distinct_ips` the added nodes bind 127.0.0.2, 127.0.0.3, ... (all loopback on Linux),
    so Ray reports them as separate machines, as it would on a real multi-machine cluster.

    RAY_ADDRESS is set *before* the nodes start so every process of this cluster inherits it:
    Ray Train's placement-group cleaner otherwise auto-detects "the latest" Ray instance on a
    machine that runs several, and may ask another cluster whether our controller is alive.
    The caller shuts it down (`ray.shutdown(); cluster.shutdown()`).
    """
    import ray
    from ray.cluster_utils import Cluster

    port = free_port()
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "gcs_server_port": port,
                                                            "dashboard_port": free_port()})
    for i in range(num_nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node, **({"node_ip_address": f"127.0.0.{i + 2}"} if distinct_ips else {}))
    cluster.wait_for_nodes()
    assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
    return cluster
