"""Multi-host units without Ray: the collective socket interface and the shared-storage verdict."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from latentforge.training.network import GLOO_VAR, NCCL_VAR, choose_socket_interface, interface_for_address


def _entry(family: int, address: str) -> SimpleNamespace:
    return SimpleNamespace(family=family, address=address)


INTERFACES = {
    "lo": [_entry(socket.AF_INET, "127.0.0.1"), _entry(socket.AF_INET6, "::1")],
    "veth-host1": [_entry(socket.AF_INET, "10.77.0.2"), _entry(socket.AF_INET6, "fe80::1%veth-host1")],
    "eth1": [_entry(socket.AF_INET, "192.168.5.9"), _entry(socket.AF_PACKET, "10.77.0.2")],
}


def test_the_interface_holding_the_address_is_found() -> None:
    assert interface_for_address("10.77.0.2", INTERFACES) == "veth-host1"
    assert interface_for_address("192.168.5.9", INTERFACES) == "eth1"
    assert interface_for_address("fe80::1", INTERFACES) == "veth-host1"  # zone suffix ignored
    assert interface_for_address("10.77.0.9", INTERFACES) is None


def test_this_machines_loopback_is_found_without_a_table() -> None:
    # Real psutil on this machine: loopback always holds 127.0.0.1 (named "lo" on Linux).
    assert interface_for_address("127.0.0.1") == "lo"


def test_gloo_variable_is_set_on_cpu_nodes_only() -> None:
    environ: dict[str, str] = {}
    choice = choose_socket_interface("10.77.0.2", use_gpu=False, environ=environ, interfaces=INTERFACES)
    assert environ == {GLOO_VAR: "veth-host1"}
    assert choice.describe() == "node 10.77.0.2: GLOO_SOCKET_IFNAME=veth-host1 (set)"


def test_gpu_nodes_also_get_the_nccl_variable() -> None:
    environ: dict[str, str] = {}
    choose_socket_interface("192.168.5.9", use_gpu=True, environ=environ, interfaces=INTERFACES)
    assert environ == {GLOO_VAR: "eth1", NCCL_VAR: "eth1"}


def test_the_users_own_setting_is_kept_and_named() -> None:
    environ = {NCCL_VAR: "ib0"}
    choice = choose_socket_interface("10.77.0.2", use_gpu=True, environ=environ, interfaces=INTERFACES)
    assert environ == {GLOO_VAR: "veth-host1", NCCL_VAR: "ib0"}
    assert "NCCL_SOCKET_IFNAME=ib0 (set by the user, kept)" in choice.describe()


def test_an_address_on_no_interface_sets_nothing_and_says_so() -> None:
    environ: dict[str, str] = {}
    choice = choose_socket_interface("10.77.0.9", use_gpu=False, environ=environ, interfaces=INTERFACES)
    assert environ == {}
    assert "no local interface holds 10.77.0.9" in choice.describe()


def test_shared_storage_that_a_node_does_not_see_is_refused_naming_it() -> None:
    import pytest

    from latentforge.config import ConfigError
    from latentforge.training.run_storage import check_storage_seen

    check_storage_seen("/mnt/nfs/runs", {"10.77.0.2": "same", "10.77.0.3": "same"}, "10.77.0.1")
    with pytest.raises(ConfigError, match=r"do not see: 10\.77\.0\.3 \(no such directory\)\. Mount"):
        check_storage_seen("/mnt/nfs/runs", {"10.77.0.2": "same", "10.77.0.3": "missing"}, "10.77.0.1")
    with pytest.raises(ConfigError, match=r"10\.77\.0\.2 \(a different directory\), 10\.77\.0\.3 \(no such"):
        check_storage_seen("/mnt/nfs/runs", {"10.77.0.2": "other", "10.77.0.3": "missing"}, "10.77.0.1")
