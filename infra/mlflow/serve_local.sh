#!/usr/bin/env bash
# `make mlflow`: a real MLflow server on 127.0.0.1 over the local store the jobs write by default
# (./mlruns/mlflow.db, artifacts in ./mlruns/artifacts), so every demo and job run shows up.
#   MLFLOW_PORT=5000  MLFLOW_STORE=./mlruns  bash infra/mlflow/serve_local.sh
# It binds loopback only. For a shared team server use infra/mlflow/docker-compose.yml
# (PostgreSQL, S3-compatible artifacts, authentication); see docs/operations.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PORT="${MLFLOW_PORT:-5000}"
STORE="$(mkdir -p "${MLFLOW_STORE:-$ROOT/mlruns}" && cd "${MLFLOW_STORE:-$ROOT/mlruns}" && pwd)"
mkdir -p "$STORE/artifacts"
MLFLOW_BIN="mlflow"
[ -x "$ROOT/.venv/bin/mlflow" ] && MLFLOW_BIN="$ROOT/.venv/bin/mlflow"
echo "MLflow UI: http://127.0.0.1:${PORT}  (store: $STORE/mlflow.db; Ctrl-C to stop)" >&2
exec "$MLFLOW_BIN" server --host 127.0.0.1 --port "$PORT" \
  --backend-store-uri "sqlite:///$STORE/mlflow.db" \
  --default-artifact-root "file://$STORE/artifacts" \
  --workers "${MLFLOW_WORKERS:-1}"
