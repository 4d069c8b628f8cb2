#!/usr/bin/env bash
# A three-host Ray cluster on this one Linux machine, for trying multi-host behaviour by hand:
#
#   sudo infra/netns/cluster.sh [--workers N]
#
# A head and N worker hosts (default 2), each in its own network namespace with its own address
# on a bridge (10.77.<n>.1 head, .2, .3, ... workers), joined with the real `ray start --address`
# and token auth. It prints the addresses, the shared directory and the node-local path, then
# waits; Ctrl-C stops every process and removes the namespaces, veths, bridge and /etc/netns
# entries. Needs root and iproute2. Details: infra/netns/README.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m tests.harness.netns_cluster "$@"
