"""A real multi-host Ray cluster on one Linux machine: a head and worker hosts, each in its own
network namespace with its own address on a bridge, joined with the real `ray start --address`.

    root namespace:  bridge lf<id>br (10.77.<n>.254/24)
    head   netns:    10.77.<n>.1   ray start --head (GCS, dashboard on the head's 127.0.0.1)
    host1  netns:    10.77.<n>.2   ray start --address 10.77.<n>.1:6379, resource {"host1": 1}
    host2  netns:    10.77.<n>.3   ...

Like a fresh Debian/Ubuntu machine, every host's /etc/hosts maps the hostname to 127.0.1.1
(`ip netns exec` bind-mounts /etc/netns/<ns>/hosts): a collective backend that trusts the
hostname binds loopback there. Nothing here sets GLOO_SOCKET_IFNAME - that is the product's job.

Storage: `shared` is one directory every host sees (the NFS case). `node_local` is one path
that each host sees as a different directory (a bind mount in the host's own mount namespace,
inherited by its raylet and workers), as a local disk would be; `host_dir(name)` is that
directory from the outside.

Each namespace has its own port space, so Ray's default ports are used on every host. Token
auth is on (RAY_AUTH_MODE=token; the token file in ~/.ray is shared, as one filesystem is).
`python -m tests.harness.netns_cluster` (from the repository root, as root) runs it by hand (see infra/netns/README.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.ray_head import VENV_BIN, venv_env

REPO = Path(__file__).resolve().parents[2]
GCS_PORT = 6379
DASHBOARD_PORT = 8265
OBJECT_STORE_BYTES = 150 * 2**20


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (one clear reason), or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    probe = f"lfprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    name: str
    netns: str
    address: str
    veth: str
    """Root-namespace end of the host's veth pair (on the bridge); the other end is `eth0` inside."""
    num_cpus: int = 1
    process: subprocess.Popen | None = None
    starts: int = 0
    lost: bool = False


@dataclass
class NetnsCluster:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lfns-")))
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    subnet: int = field(default_factory=lambda: 100 + int(uuid.uuid4().hex[:2], 16) % 150)
    hosts: dict[str, Host] = field(default_factory=dict)

    # --- layout ----------------------------------------------------------------------------
    @property
    def bridge(self) -> str:
        return f"lf{self.tag}br"

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def node_local(self) -> Path:
        """One path, a different directory on every host."""
        return self.root / "node-local"

    def host_dir(self, name: str) -> Path:
        return self.root / "hosts" / name

    @property
    def head_address(self) -> str:
        return f"{self.hosts['head'].address}:{GCS_PORT}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for commands run on a host (drivers, `ray job submit`)."""
        return venv_env(RAY_ADDRESS=self.head_address, RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{DASHBOARD_PORT}",
                        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "platform")]), **extra)

    # --- network ---------------------------------------------------------------------------
    def _make_netns(self, name: str, index: int) -> Host:
        host = Host(name=name, netns=f"lf{self.tag}{name}", address=f"10.77.{self.subnet}.{index}",
                    veth=f"lf{self.tag}{name[0]}{index}")
        _ip("netns", "add", host.netns)
        self.hosts[name] = host
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", host.veth, "master", self.bridge, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / host.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
        return host

    def set_link(self, name: str, up: bool) -> None:
        """Cut (or restore) a host's network, as a partition would: its eth0 goes down."""
        _ip("-n", self.hosts[name].netns, "link", "set", "eth0", "up" if up else "down")

    # --- processes -------------------------------------------------------------------------
    def popen(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start `cmd` on host `name`: its network namespace and its node-local mount."""
        local = self.host_dir(name) / "local"
        local.mkdir(parents=True, exist_ok=True)
        script = 'mount --bind "$0" "$1" && shift && exec "$@"'
        full = ["ip", "netns", "exec", self.hosts[name].netns, "sh", "-c", script, str(local), str(self.node_local),
                *cmd]
        kwargs.setdefault("env", self.env())
        return subprocess.Popen(full, start_new_session=True, **kwargs)

    def run(self, name: str, cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        proc = self.popen(name, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[harness: killed after {timeout} s]"
        return subprocess.CompletedProcess(cmd, proc.returncode, out, None)

    def _ray_start(self, host: Host, head: bool) -> None:
        temp = self.root / "ray" / host.name  # short: Ray's unix sockets live under it
        temp.mkdir(parents=True, exist_ok=True)
        role = (["--head", "--port", str(GCS_PORT), "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(DASHBOARD_PORT)] if head else ["--address", self.head_address])
        cmd = [f"{VENV_BIN}/ray", "start", "--block", "--disable-usage-stats", *role,
               "--node-ip-address", host.address, "--temp-dir", str(temp), "--num-cpus", str(host.num_cpus),
               "--object-store-memory", str(OBJECT_STORE_BYTES), "--resources", f'{{"{host.name}": 1}}']
        log = open(self.root / f"ray_start_{host.name}.log", "ab")
        # Every "host" sees the whole machine's memory, used by everything else running on it too;
        # Ray's memory monitor would kill this cluster's workers for other programs' memory.
        env = self.env(RAY_memory_monitor_refresh_ms="0")
        host.process = self.popen(host.name, cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        host.starts += 1

    def add_host(self, name: str, index: int, num_cpus: int = 1) -> Host:
        """A worker host joining the cluster (also: the replacement for a lost one)."""
        host = self._make_netns(name, index)
        host.num_cpus = num_cpus
        self._ray_start(host, head=False)
        return host

    def start(self, workers: int = 2, cpus_per_host: int = 1, timeout_s: float = 150) -> "NetnsCluster":
        self.shared.mkdir(parents=True, exist_ok=True)
        self.node_local.mkdir(parents=True, exist_ok=True)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"10.77.{self.subnet}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            # The head holds no CPU: the driver and the Train controller need none, so every
            # training worker lands on a worker host.
            head = self._make_netns("head", 1)
            head.num_cpus = 0
            self._ray_start(head, head=True)
            self.wait_for_nodes(1, timeout_s)
            for i in range(workers):  # one at a time: a loaded machine times out parallel raylet starts
                self.add_host(f"host{i + 1}", i + 2, cpus_per_host)
                self.wait_for_nodes(2 + i, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def alive_nodes(self) -> list[str]:
        """Node addresses Ray reports alive (asked from the head, as a driver there would)."""
        code = ("import ray, json; ray.init(log_to_driver=False); "
                "print('NODES', json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        out = self.run("head", [f"{VENV_BIN}/python", "-c", code], timeout=60).stdout
        line = [x for x in out.splitlines() if x.startswith("NODES ")]
        return json.loads(line[-1][6:]) if line else []

    def wait_for_nodes(self, count: int, timeout_s: float) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for host in self.hosts.values():
                if not host.lost and host.process is not None and host.process.poll() is not None:
                    self._retry_start(host)
            if len(nodes := self.alive_nodes()) >= count:
                return nodes
            time.sleep(2)
        raise TimeoutError(f"{count} Ray nodes not alive in {timeout_s}s: {self.alive_nodes()}")

    def actors_on(self, name: str) -> list[str]:
        """Class names of the actors Ray started on host `name` (from its worker logs' first line)."""
        logs = (self.root / "ray" / name).glob("session_*/logs/worker-*.out")
        return sorted(line[len(":actor_name:"):].strip() for path in logs
                      for line in path.read_text(errors="replace").splitlines()[:5] if line.startswith(":actor_name:"))

    def _retry_start(self, host: Host) -> None:
        """`ray start` gives a raylet 30 s to register (hard-coded); on a loaded machine, try again."""
        log = (self.root / f"ray_start_{host.name}.log").read_text()[-3000:]
        if host.name == "head" or host.starts >= 3:
            raise RuntimeError(f"ray start on {host.name} exited {host.starts} time(s): {log}")
        self._kill_processes(host)
        self._ray_start(host, head=False)

    def kill_host(self, name: str) -> None:
        """SIGKILL every process in the host's namespace (raylet, workers), as a crashed machine."""
        self.hosts[name].lost = True
        self._kill_processes(self.hosts[name])

    def _kill_processes(self, host: Host) -> None:
        pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        if host.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.process.pid, signal.SIGKILL)
            host.process.wait(timeout=30)

    def stop(self) -> None:
        """Kill every host's processes and remove namespaces, veths, the bridge and /etc/netns files."""
        for name in reversed(list(self.hosts)):
            self.kill_host(name)
        for host in self.hosts.values():
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / host.netns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self.hosts.clear()


def main() -> None:
    """By hand: start the cluster, print how to use it, keep it until Ctrl-C, then remove it all."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker hosts besides the head")
    args = parser.parse_args()
    if reason := unavailable_reason():
        sys.exit(f"netns cluster: cannot run: {reason}")
    cluster = NetnsCluster().start(workers=args.workers)
    try:
        print(f"nodes: {cluster.alive_nodes()}\nshared storage: {cluster.shared}\nnode-local path: "
              f"{cluster.node_local}\nrun on the head: ip netns exec {cluster.hosts['head'].netns} ...  "
              f"(RAY_ADDRESS={cluster.head_address}, RAY_AUTH_MODE=token)\nCtrl-C stops and removes everything",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    main()
