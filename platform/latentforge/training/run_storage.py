"""Where a training run lives (STORAGE/RUN_NAME) and what makes a rerun a resume.

`STORAGE/RUN_NAME/latentforge_run.json` is written by the driver before any worker starts:
the MLflow run id and the data manifest digest. A rerun with the same name finds it and
continues the same MLflow run (Ray Train itself restores the latest checkpoint from the same
directory); a rerun on different data is refused, because the checkpoint's data position
would point into a different sample order.
"""

from __future__ import annotations

from typing import Any, Iterable

from latentforge import storage
from latentforge.config import ConfigError

RUN_STATE = "latentforge_run.json"


def is_local_path(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def check_storage(storage_path: str, node_addresses: Iterable[str], storage_is_shared: bool) -> None:
    """Refuse a multi-node run whose checkpoints would land on one node's local disk.

    node_addresses: IPs of the alive nodes that can host workers. Several "nodes" on one IP
    (ray.cluster_utils.Cluster) share one filesystem, so they count as one machine.
    """
    machines = sorted(set(node_addresses))
    if is_local_path(storage_path) and len(machines) > 1 and not storage_is_shared:
        raise ConfigError(
            f"storage_path {storage_path!r} is a local path but the cluster spans {len(machines)} machines "
            f"({', '.join(machines[:4])}{', ...' if len(machines) > 4 else ''}): each worker would write its "
            "checkpoint part to its own disk and a restart could not find it. Use a shared URI (s3://, gs://, "
            "...) or, for a filesystem mounted at the same path on every node (NFS), pass --storage-is-shared")


STORAGE_VIEWS = {"same": "", "other": "a different directory", "missing": "no such directory"}
"""What a node sees at the driver's storage path: the same directory, another one, or none."""


def check_storage_seen(storage_path: str, views: dict[str, str], driver_address: str) -> None:
    """Refuse `--storage-is-shared` when a node does not see the directory the driver sees.

    views: node address -> a key of STORAGE_VIEWS, from looking for a file the driver wrote
    there (a path mounted on some nodes only, or a local disk at the same path, fails this).
    """
    wrong = sorted(f"{address} ({STORAGE_VIEWS[view]})" for address, view in views.items() if view != "same")
    if wrong:
        raise ConfigError(
            f"--storage-is-shared, but storage_path {storage_path!r} is not one directory on every node: the "
            f"driver (on {driver_address}) wrote a file there that these nodes do not see: {', '.join(wrong)}. "
            "Mount the shared filesystem at that path on every node, or use a shared URI (s3://, gs://, ...)")


def run_dir(storage_path: str, run_name: str) -> str:
    return storage.join(storage_path, run_name)


def export_dir(storage_path: str, run_name: str) -> str:
    return storage.join(storage_path, run_name, "export")


def read_run_state(storage_path: str, run_name: str) -> dict[str, Any] | None:
    uri = storage.join(run_dir(storage_path, run_name), RUN_STATE)
    return storage.read_json(uri) if storage.exists(uri) else None


def check_resume(previous: dict[str, Any], data_dir: str, data_digest: str, run_name: str) -> None:
    if previous.get("data_manifest_sha256") != data_digest:
        raise ConfigError(
            f"run {run_name!r} was started on data {previous.get('data_dir')!r} (manifest sha256 "
            f"{str(previous.get('data_manifest_sha256'))[:12]}...), this one is {data_dir!r} ({data_digest[:12]}...); "
            "a resumed run must use the same latents. Pick a new --run-name to train on other data")


def write_run_state(storage_path: str, run_name: str, state: dict[str, Any]) -> None:
    storage.atomic_write_json(storage.join(run_dir(storage_path, run_name), RUN_STATE), state)
