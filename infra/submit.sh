#!/usr/bin/env bash
# Submit a LatentForge stage to a Ray cluster with token authentication and the project's
# runtime environment:
#
#   infra/submit.sh [--address URL] [--no-wait] [--submission-id ID] -- python jobs/<stage>.py [flags...]
#
# The address is --address, else RAY_ADDRESS, else http://127.0.0.1:8265 (what
# `ray dashboard infra/ray/cluster.yaml` or `kubectl port-forward svc/latentforge-head-svc 8265`
# gives you: the dashboard is never exposed publicly). The token comes from RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. MLFLOW_TRACKING_URI and LATENTFORGE_EXPERIMENT,
# when set here, are forwarded to the job; MLflow credentials are not (the cluster has its own).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
WAIT=1
SUBMISSION_ID=""
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    --submission-id) SUBMISSION_ID="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "submit.sh: unknown option $1 (the job's command goes after --)" >&2; usage 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "submit.sh: no job command given after --" >&2; usage 2; }

# The entrypoint must be one of this repository's jobs: catch typos before the upload.
script=""
for arg in "$@"; do
  case "$arg" in jobs/*.py) script="$arg"; break ;; esac
done
if [ -z "$script" ] || [ ! -f "$ROOT/$script" ]; then
  echo "submit.sh: the command must run a job script that exists in jobs/ (got: $*)" >&2
  exit 2
fi

export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
  echo "submit.sh: token authentication is on but no token was found; set RAY_AUTH_TOKEN," >&2
  echo "  RAY_AUTH_TOKEN_PATH or write ~/.ray/auth_token (see docs/operations.md)" >&2
  exit 2
fi

RAY_BIN="ray"
[ -x "$ROOT/.venv/bin/ray" ] && RAY_BIN="$ROOT/.venv/bin/ray"
PY_BIN="python3"
[ -x "$ROOT/.venv/bin/python" ] && PY_BIN="$ROOT/.venv/bin/python"

# infra/runtime_env.yaml plus the caller's MLflow settings, in a private temp file.
RUNTIME_ENV="$(mktemp "${TMPDIR:-/tmp}/lf-runtime-env.XXXXXX.yaml")"
trap 'rm -f "$RUNTIME_ENV"' EXIT
"$PY_BIN" - "$ROOT/infra/runtime_env.yaml" "$RUNTIME_ENV" <<'PY'
import os, sys, yaml
env = yaml.safe_load(open(sys.argv[1]))
for key in ("MLFLOW_TRACKING_URI", "LATENTFORGE_EXPERIMENT"):
    if os.environ.get(key):
        env.setdefault("env_vars", {})[key] = os.environ[key]
yaml.safe_dump(env, open(sys.argv[2], "w"))
PY

stage="$(basename "$script" .py)"
args=(job submit --address "$ADDRESS" --runtime-env "$RUNTIME_ENV" --entrypoint-num-cpus 1
      --submission-id "${SUBMISSION_ID:-lf-${stage//_/-}-$(date -u +%Y%m%d-%H%M%S)}")
[ "$WAIT" = 1 ] || args+=(--no-wait)
cd "$ROOT"
echo "+ ray ${args[*]} -- $*" >&2
exec "$RAY_BIN" "${args[@]}" -- "$@"
