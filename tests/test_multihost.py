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
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.harness.netns_cluster import DASHBOARD_PORT, Host, NetnsCluster, unavailable_reason
from tests.harness.ray_head import VENV_BIN

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
# Generous limits: on a loaded 2-core machine one step can take 10 s and a host 60 s to join.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def cluster():
    if reason := unavailable_reason():
        pytest.skip(f"multi-host harness unavailable: {reason}")
    cluster = NetnsCluster().start(workers=2, cpus_per_host=2)  # 2: a precompute actor and its reads per host
    sys.path[:0] = [str(REPO / "platform")]
    from tests.harness.latent_shards import write_latent_dataset

    from latentforge.models.text_encoder import save_tiny_clip_checkpoint
    from tests.harness.tiny_models import save_tiny_autoencoder_kl
    from tests.harness.ingest_shards import write_ingest_shards

    write_latent_dataset(cluster.shared / "latents", shard_sizes=[16, 16], width=16)
    write_ingest_shards(cluster.shared / "ingest", shard_sizes=(12, 12))
    save_tiny_autoencoder_kl(cluster.shared / "kl")
    save_tiny_clip_checkpoint(cluster.shared / "clip.safetensors")
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)


def submit_command(cluster: NetnsCluster, job_args: list[str]) -> list[str]:
    """`ray job submit` on the head; the entrypoint runs on the head (resource "head"), which holds no CPU."""
    # A 0.1 s controller poll registers each reported checkpoint at once (Ray's default: 2 s), so a
    # host killed after step 3 resumes from the checkpoint of step 2.
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cluster.shared / 'mlflow.db'}", "PYTHONUNBUFFERED": "1",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
           # Ray sets a worker's torch threads to its CPUs (2 here, see cluster_train_args); the one-host
           # reference runs 1-CPU workers, and bit-equal weights need the same reduction order.
           "OMP_NUM_THREADS": "1"}
    return [f"{VENV_BIN}/ray", "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}",
            "--entrypoint-resources", '{"head": 1}', "--runtime-env-json", json.dumps({"env_vars": env}), "--",
            f"{VENV_BIN}/python", *job_args]


def submit(cluster: NetnsCluster, job_args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return cluster.run("head", submit_command(cluster, job_args), timeout=timeout)


def train_args(data: Path, storage: Path, run_name: str, *extra: str) -> list[str]:
    return [str(REPO / "jobs" / "train.py"), "--preset", "tiny", "--data", str(data), "--steps", str(STEPS),
            "--batch-size", "4", "--lr", "2e-3", "--num-workers", "2", "--placement-strategy", "SPREAD",
            "--storage-path", str(storage), "--run-name", run_name, "--checkpoint-every", "2", "--eval-every", "0",
            "--log-every", "1", "--trace-dir", str(storage / "trace" / run_name), *extra]


def cluster_train_args(cluster: NetnsCluster, run_name: str, *extra: str) -> list[str]:
    """A run on the shared storage; 2 CPUs per worker = one worker per host (each host has 2)."""
    return train_args(cluster.shared / "latents", cluster.shared / "runs", run_name, "--storage-is-shared",
                      "--cpus-per-worker", "2", *extra)


def trace_events(trace_dir: Path, rank: int) -> list[dict]:
    path = trace_dir / f"trace_rank{rank}.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # whole lines only
    return [json.loads(line) for line in lines]


def final_weights(trace_dir: Path, rank: int) -> str:
    return [e for e in trace_events(trace_dir, rank) if e["event"] == "final"][-1]["weights_sha256"]


def print_rate(label: str, output: str) -> None:
    """The stage summary's throughput line, for docs/benchmarks.md (`pytest -s` shows it)."""
    rows = [line.strip() for line in output.splitlines() if "samples/s" in line and ("this run" in line or "mean" in line)]
    print(f"multihost: {label}: {rows[-1] if rows else 'no throughput line'}")


def wait_until(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s"
        time.sleep(0.05)


def add_replacement_host(cluster: NetnsCluster) -> Host:
    """A new 2-CPU worker host with the next free name and address (head .1, hostK .K+1)."""
    index = len(cluster.hosts) + 1
    return cluster.add_host(f"host{index - 1}", index, num_cpus=2)


def test_ray_sees_three_hosts_with_their_own_addresses(cluster) -> None:
    expected = sorted(h.address for h in cluster.hosts.values())
    assert len(set(expected)) == 3
    assert cluster.alive_nodes() == expected
    resolved = cluster.run("host1", ["python3", "-c", "import socket; print(socket.gethostbyname(socket.gethostname()))"],
                           timeout=30).stdout.strip()
    assert resolved == "127.0.1.1"  # the trap the platform must not fall into


@pytest.fixture(scope="module")
def spread_run(cluster):
    """The uninterrupted 2-worker SPREAD run across the worker hosts, submitted with `ray job submit`."""
    proc = submit(cluster, cluster_train_args(cluster, "spread"))
    assert proc.returncode == 0, proc.stdout[-6000:]
    print_rate("train, 2 worker hosts", proc.stdout)
    return proc.stdout, cluster.shared / "runs"


def pinned_interfaces(output: str) -> dict[str, str]:
    """Node address -> GLOO_SOCKET_IFNAME, from the process-group lines the Train controller prints."""
    return dict(re.findall(r"process-group socket on node (10\.77\.\d+\.\d+): GLOO_SOCKET_IFNAME=(\w+) \(set\)",
                           output))


def test_spread_training_across_hosts_pins_gloo_to_each_nodes_interface(cluster, spread_run) -> None:
    output, storage = spread_run
    pinned = pinned_interfaces(output)
    workers = sorted(cluster.hosts[h].address for h in ("host1", "host2"))
    assert sorted(pinned) == workers, output[-4000:]  # two workers, on the two worker hosts' addresses
    assert set(pinned.values()) == {"eth0"}  # the interface holding each node's Ray address
    export = json.loads((storage / "spread" / "export" / "manifest.json").read_text())
    assert export["extra"]["step"] == STEPS
    trace = storage / "trace" / "spread"
    assert final_weights(trace, 0) == final_weights(trace, 1)


def test_training_on_two_hosts_ends_with_the_weights_of_one_host(cluster, spread_run, tmp_path) -> None:
    """The same run on one machine (an embedded 2-CPU Ray, 2 workers) ends with the same weights."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "platform")]))
    env.pop("RAY_ADDRESS", None)
    single = subprocess.run([sys.executable, *train_args(cluster.shared / "latents", tmp_path / "runs", "single")],
                            env=env, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, (single.stdout + single.stderr)[-4000:]
    print_rate("train, one host (embedded Ray)", single.stdout)
    assert final_weights(tmp_path / "runs" / "trace" / "single", 0) == final_weights(spread_run[1] / "trace" / "spread", 0)


def test_the_autoencoder_trains_across_hosts_with_their_own_addresses(cluster) -> None:
    """The autoencoder's 2-worker SPREAD run: the same driver, so the same process group on each node's address."""
    storage = cluster.shared / "ae-runs"
    proc = submit(cluster, [str(REPO / "jobs" / "train_autoencoder.py"), "--preset", "tiny", "--data",
                            str(cluster.shared / "ingest"), "--resolution", "16", "--steps", str(STEPS),
                            "--batch-size", "4", "--num-workers", "2", "--placement-strategy", "SPREAD",
                            "--cpus-per-worker", "2", "--storage-path", str(storage), "--storage-is-shared",
                            "--run-name", "ae-spread", "--checkpoint-every", "2", "--eval-every", "0",
                            "--val-samples", "2", "--scale-samples", "4", "--log-every", "1"])
    assert proc.returncode == 0, proc.stdout[-6000:]
    pinned = pinned_interfaces(proc.stdout)
    workers = sorted(cluster.hosts[h].address for h in ("host1", "host2"))
    assert sorted(pinned) == workers, proc.stdout[-4000:]  # one worker on each worker host, on its address
    assert set(pinned.values()) == {"eth0"}
    export = json.loads((storage / "ae-spread" / "export" / "manifest.json").read_text())
    assert export["extra"]["step"] == STEPS
    assert export["counts"]["samples_seen"] == STEPS * 4 * 2  # both ranks' images: one DDP group over the hosts


def drive(cluster: NetnsCluster, job_args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """A job's driver run directly on the head (what `ray job submit` runs there, without the supervisor)."""
    env = cluster.env(MLFLOW_TRACKING_URI=f"sqlite:///{cluster.shared / 'mlflow.db'}")
    return cluster.run("head", [f"{VENV_BIN}/python", *job_args], timeout=timeout, env=env)


def test_storage_that_is_not_shared_is_refused_before_training(cluster) -> None:
    data, local = cluster.shared / "latents", cluster.node_local
    host1, host2 = (cluster.hosts[h].address for h in ("host1", "host2"))
    plain = drive(cluster, train_args(data, local / "runs", "local"))
    assert plain.returncode == 2, plain.stdout[-3000:]
    assert f"is a local path but the cluster spans 2 machines ({host1}, {host2})" in plain.stdout
    # Claimed shared, but each host has a directory of its own disk there.
    for host in ("host1", "host2"):
        (cluster.host_dir(host) / "local" / "runs").mkdir()
    claimed = drive(cluster, train_args(data, local / "runs", "claimed", "--storage-is-shared"))
    assert claimed.returncode == 2, claimed.stdout[-3000:]
    assert f"do not see: {host1} (a different directory), {host2} (a different directory)" in claimed.stdout
    # A path that exists on one host only (host1's disk has it, host2 has nothing there).
    (cluster.host_dir("host1") / "local" / "only-host1").mkdir()
    one = drive(cluster, train_args(data, local / "only-host1", "one", "--storage-is-shared"))
    assert one.returncode == 2, one.stdout[-3000:]
    assert f"do not see: {host1} (a different directory), {host2} (no such directory)" in one.stdout
    for host in ("host1", "host2"):
        assert not list((cluster.host_dir(host) / "local").rglob("trace"))  # no worker ever started


def precompute_args(cluster: NetnsCluster, out: Path, concurrency: int, ingest: Path | None = None) -> list[str]:
    shared = cluster.shared
    return [str(REPO / "jobs" / "precompute_latents.py"), "--preset", "tiny", "--input", str(ingest or shared / "ingest"),
            "--output", str(out), "--vae-type", "autoencoder_kl", "--vae", str(shared / "kl"),
            "--text-encoder-weights", str(shared / "clip.safetensors"), "--text-layer", "penultimate",
            "--latent", "mean_std", "--dtype", "fp32", "--batch-size", "4", "--no-progress", "--concurrency", str(concurrency)]


ENCODER_ACTOR = "MapWorker(MapBatches(EncoderActor))"
"""How Ray Data names precompute's encoder actors (in `NetnsCluster.actors_on`)."""


def tar_hashes(out: Path) -> dict[str, str]:
    from latentforge import storage

    return {p.name: storage.sha256_file(str(p)) for p in sorted(out.glob("*.tar"))}


def precompute_on_one_host(cluster: NetnsCluster, out: Path, ingest: Path | None = None) -> subprocess.Popen:
    """Start the same precompute on an embedded Ray in the root namespace (the reference)."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{out.parent / 'mlflow.db'}", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "platform")]))
    env.pop("RAY_ADDRESS", None)
    # One encoder actor: with two, the embedded Ray's 2 CPUs leave none for the shard reads.
    return subprocess.Popen([sys.executable, *precompute_args(cluster, out, 1, ingest)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def succeeded(job: subprocess.Popen) -> str:
    """The output of a job that must exit 0."""
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-6000:]
    return output


def test_precompute_across_hosts_is_byte_identical_to_one_host(cluster, tmp_path) -> None:
    proc = submit(cluster, precompute_args(cluster, cluster.shared / "latents-multi", 2))
    assert proc.returncode == 0, proc.stdout[-6000:]
    print_rate("precompute, 2 worker hosts", proc.stdout)
    for host in ("host1", "host2"):  # an encoder actor on each worker host
        assert ENCODER_ACTOR in cluster.actors_on(host), host
    print_rate("precompute, one host (embedded Ray)", succeeded(precompute_on_one_host(cluster, tmp_path / "latents")))
    multi = tar_hashes(cluster.shared / "latents-multi")
    assert len(multi) == 2 and multi == tar_hashes(tmp_path / "latents")


def stored_keys(out: Path) -> list[str]:
    """The sample keys in the output tars, one entry per stored latent (a duplicate appears twice)."""
    keys = []
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            keys += [m.name.removesuffix(".latent.npy") for m in tar.getmembers() if m.name.endswith(".latent.npy")]
    return keys


LOST_SHARDS = 16
"""Of 40 samples each. Once the encoder actors are up, the tiny models encode a shard in about 0.2 s (measured
under load): the publishing of all shards spans a few seconds, the window in which the host is killed."""


def test_a_host_lost_mid_precompute_ends_with_the_exact_keys_and_tars(cluster, tmp_path) -> None:
    """host1 crashes (every process SIGKILLed) once some shards are published, not all; a new host joins."""
    from tests.harness.ingest_shards import write_ingest_shards

    ingest = write_ingest_shards(cluster.shared / "ingest-lost", shard_sizes=(40,) * LOST_SHARDS)
    out = cluster.shared / "latents-lost"
    encoders_before = cluster.actors_on("host1").count(ENCODER_ACTOR)  # earlier tests' actors left logs too
    job = cluster.popen("head", submit_command(cluster, precompute_args(cluster, out, 2, ingest.dir)),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reference = precompute_on_one_host(cluster, tmp_path / "latents", ingest.dir)  # meanwhile: the test waits anyway
    wait_until(lambda: list(out.glob("*.tar")), 600)
    killed = time.monotonic()
    cluster.kill_host("host1")
    published_at_kill = len(list(out.glob("*.tar")))
    assert published_at_kill < LOST_SHARDS  # provably mid-way: the rest is lost work to redo
    assert cluster.actors_on("host1").count(ENCODER_ACTOR) > encoders_before  # an encoder of this job died with it
    add_replacement_host(cluster)
    wait_until(lambda: len(list(out.glob("*.tar"))) > published_at_kill, 600)
    next_shard_s = time.monotonic() - killed
    succeeded(job)
    print(f"multihost: precompute, host lost after {published_at_kill}/{LOST_SHARDS} shards: next shard "
          f"published {next_shard_s:.1f} s after the kill, job done after {time.monotonic() - killed:.1f} s")
    keys = stored_keys(out)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(ingest.good)  # no loss, no duplicate
    succeeded(reference)
    lost = tar_hashes(out)
    assert len(lost) == LOST_SHARDS and lost == tar_hashes(tmp_path / "latents")
    cluster.wait_for_nodes(3, 300)  # the head and two worker hosts again, for the tests after this one


def test_a_lost_host_is_replaced_and_training_resumes_exactly(cluster, spread_run) -> None:
    """host2 crashes (every process SIGKILLed) after step 3; a new host joins; the run resumes from a checkpoint."""
    trace = cluster.shared / "runs" / "trace" / "lost"
    job = cluster.popen("head", submit_command(cluster, cluster_train_args(cluster, "lost", "--max-failures", "3")),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: any(e["event"] == "step" and e["step"] >= 3 for e in trace_events(trace, 0)), 900)
    killed = time.monotonic()
    cluster.kill_host("host2")
    replacement = add_replacement_host(cluster)
    wait_until(lambda: [e["event"] for e in trace_events(trace, 0)][-2:] == ["start", "step"], 900)
    recovery_s = time.monotonic() - killed
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-6000:]
    print(f"multihost: recovery after a host loss (kill -> first new step): {recovery_s:.1f} s")
    assert replacement.address in pinned_interfaces(output)  # the restarted group uses the new host
    for rank in (0, 1):
        events = trace_events(trace, rank)
        starts = [i for i, e in enumerate(events) if e["event"] == "start"]
        assert len(starts) == 2, events
        resumed = events[starts[1]]["resumed_from"]
        assert resumed in (2, 4)  # a checkpoint (every 2 steps) from before the crash
        assert [e["step"] for e in events[starts[1]:] if e["event"] == "step"] == list(range(resumed + 1, STEPS + 1))
    assert final_weights(trace, 0) == final_weights(spread_run[1] / "trace" / "spread", 0)
    state = json.loads((cluster.shared / "runs" / "lost" / "latentforge_run.json").read_text())
    export = json.loads((cluster.shared / "runs" / "lost" / "export" / "manifest.json").read_text())
    assert export["extra"]["mlflow_run_id"] == state["mlflow_run_id"]  # one MLflow run across the restart


def starts_per_rank(trace: Path) -> list[int]:
    return [sum(e["event"] == "start" for e in trace_events(trace, rank)) for rank in (0, 1)]


def test_a_short_network_blip_restarts_nothing(cluster, spread_run) -> None:
    """A worker host's link down for 3 s, well below Ray's node health-check window: no restart."""
    host = next(h for h in ("host2", "host3") if h in cluster.hosts and not cluster.hosts[h].lost)
    trace = cluster.shared / "runs" / "trace" / "blip"
    job = cluster.popen("head", submit_command(cluster, cluster_train_args(cluster, "blip", "--max-failures", "3")),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: any(e["event"] == "step" and e["step"] >= 2 for e in trace_events(trace, 0)), 900)
    cluster.set_link(host, up=False)
    time.sleep(3)
    cluster.set_link(host, up=True)
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-6000:]
    assert starts_per_rank(trace) == [1, 1]
    assert final_weights(trace, 0) == final_weights(spread_run[1] / "trace" / "spread", 0)


def test_a_partitioned_host_is_detected_and_the_group_restarts_elsewhere(cluster, spread_run) -> None:
    """A worker host's link down for good: Ray declares the node dead, Train restarts on a new host."""
    host = next(h for h in ("host2", "host3") if h in cluster.hosts and not cluster.hosts[h].lost)
    address = cluster.hosts[host].address
    trace = cluster.shared / "runs" / "trace" / "partition"
    job = cluster.popen("head", submit_command(cluster, cluster_train_args(cluster, "partition", "--max-failures",
                                                                           "3")),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: any(e["event"] == "step" and e["step"] >= 3 for e in trace_events(trace, 0)), 900)
    cut = time.monotonic()
    cluster.set_link(host, up=False)
    add_replacement_host(cluster)
    wait_until(lambda: address not in cluster.alive_nodes(), 300)
    detected_s = time.monotonic() - cut
    wait_until(lambda: starts_per_rank(trace) == [2, 2], 900)
    restarted_s = time.monotonic() - cut
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-6000:]
    print(f"multihost: partition of {address}: node declared dead after {detected_s:.1f} s, "
          f"worker group restarted after {restarted_s:.1f} s")
    assert detected_s > 10  # Ray's health checks, not an instant failure
    assert final_weights(trace, 0) == final_weights(spread_run[1] / "trace" / "spread", 0)
