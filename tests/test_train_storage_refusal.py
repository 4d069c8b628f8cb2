"""A multi-machine cluster with a node-local storage_path is refused by jobs/train.py, end to end.

The subprocess (this file run as a script) starts a `ray.cluster_utils.Cluster` whose second node
binds 127.0.0.2, so Ray reports two machines, and runs jobs/train.py against it twice: with a local
storage path (refused before any worker starts: exit 2 and the reason) and the same path with
--storage-is-shared (the user says it is mounted everywhere), which must get past the check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _cluster_main(work: Path) -> None:
    sys.path[:0] = [str(REPO), str(REPO / "platform")]
    from tests.harness.latent_shards import write_latent_dataset

    write_latent_dataset(work / "latents", shard_sizes=[16, 16], width=16)
    import ray

    from tests.harness.ray_head import start_simulated_cluster

    cluster = start_simulated_cluster(num_nodes=2, cpus_per_node=1, distinct_ips=True)
    from jobs.train import main

    args = ["--preset", "tiny", "--data", str(work / "latents"), "--steps", "1", "--batch-size", "4",
            "--num-workers", "2", "--placement-strategy", "SPREAD", "--storage-path", str(work / "runs"),
            "--eval-every", "0"]
    codes = {"local": main(args + ["--run-name", "local"]),
             "shared": main(args + ["--run-name", "shared", "--storage-is-shared"])}
    (work / "codes.json").write_text(json.dumps(codes))
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_node_local_storage_on_two_machines_is_refused(tmp_path) -> None:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "platform")]))
    env.pop("RAY_ADDRESS", None)
    env.pop("LATENTFORGE_PIPELINE_RUN_ID", None)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    codes = json.loads((tmp_path / "codes.json").read_text())
    assert codes["local"] == 2, output[-6000:]
    assert "is a local path but the cluster spans 2 machines (127.0.0.2," in output
    assert not (tmp_path / "runs" / "local").exists()  # refused before anything was written
    assert codes["shared"] == 0, output[-6000:]
    assert (tmp_path / "runs" / "shared").exists()


if __name__ == "__main__":
    _cluster_main(Path(sys.argv[1]))
