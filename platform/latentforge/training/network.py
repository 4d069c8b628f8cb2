"""Which network interface a training worker's collective backend (gloo, NCCL) should use.

Without GLOO_SOCKET_IFNAME, gloo binds the address the machine's hostname resolves to; Debian
and Ubuntu map the hostname to 127.0.1.1 in /etc/hosts, so on a real multi-machine cluster
every rank advertises a loopback address and the process group never forms. The address Ray
already uses for the node is known to reach the other nodes, so the interface holding it is
the right one for the collectives too.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

GLOO_VAR = "GLOO_SOCKET_IFNAME"
NCCL_VAR = "NCCL_SOCKET_IFNAME"


def interface_for_address(address: str, interfaces: Mapping[str, Sequence[Any]] | None = None) -> str | None:
    """Name of the local interface that holds `address` (IPv4 or IPv6), or None.

    interfaces: `psutil.net_if_addrs()`-shaped mapping (name -> entries with .family and
    .address); read from the machine when None.
    """
    if interfaces is None:
        import psutil

        interfaces = psutil.net_if_addrs()
    for name in sorted(interfaces):
        for entry in interfaces[name]:
            # IPv6 link-local entries carry a zone suffix ("fe80::1%eth0").
            if entry.family in (socket.AF_INET, socket.AF_INET6) and entry.address.split("%")[0] == address:
                return name
    return None


@dataclass
class SocketChoice:
    """What `choose_socket_interface` decided for one worker."""

    address: str
    interface: str | None
    set_vars: dict[str, str]
    kept_vars: dict[str, str]

    def describe(self) -> str:
        """One log line: the node address, the variables set and those the user had set."""
        parts = [f"{k}={v} (set)" for k, v in self.set_vars.items()]
        parts += [f"{k}={v} (set by the user, kept)" for k, v in self.kept_vars.items()]
        if self.interface is None:
            parts.append(f"no local interface holds {self.address}; gloo/NCCL choose on their own")
        return f"node {self.address}: " + ", ".join(parts)


def choose_socket_interface(node_address: str, use_gpu: bool, environ: MutableMapping[str, str],
                            interfaces: Mapping[str, Sequence[Any]] | None = None) -> SocketChoice:
    """Set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME with GPUs) in `environ` to the interface of
    `node_address`, unless the user already set them; must run before init_process_group."""
    names = (GLOO_VAR, NCCL_VAR) if use_gpu else (GLOO_VAR,)
    kept = {name: environ[name] for name in names if environ.get(name)}
    interface = interface_for_address(node_address, interfaces)
    chosen = {name: interface for name in names if name not in kept and interface is not None}
    environ.update(chosen)
    return SocketChoice(address=node_address, interface=interface, set_vars=chosen, kept_vars=kept)
