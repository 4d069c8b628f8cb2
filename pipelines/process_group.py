"""Ray Train's torch backend, with each worker's gloo/NCCL socket pinned to its node's Ray address.

Ray Train's `_TorchBackend.on_start` creates the process group in every worker before the
training loop runs, so the interface must be chosen in a step before that: this backend runs
`pin_socket_interface` on every worker first (see latentforge.training.network for why).
A runtime_env cannot do it: its env_vars are the same on every node, the interface is not.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from latentforge.training.network import choose_socket_interface

log = logging.getLogger("latentforge.train")


def pin_socket_interface(use_gpu: bool) -> str:
    """In a worker: set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME) for this node; the log line."""
    import ray

    choice = choose_socket_interface(ray.util.get_node_ip_address(), use_gpu, os.environ)
    line = f"train: process-group socket on {choice.describe()}"
    log.info(line)
    return line


class _NodeInterfaceBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        use_gpu = worker_group.get_resources_per_worker().get("GPU", 0) > 0
        for rank, line in enumerate(worker_group.execute(pin_socket_interface, use_gpu=use_gpu)):
            # The controller's log reaches the driver's console; the workers' logging may not.
            print(f"{line} (rank {rank})", flush=True)
        super().on_start(worker_group, backend_config)


class NodeInterfaceTorchConfig(TorchConfig):
    """TorchConfig whose backend pins each worker's collective socket before init_process_group."""

    @property
    def backend_cls(self) -> type:
        return _NodeInterfaceBackend
