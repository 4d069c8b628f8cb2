"""Run `jobs/<name>.py` as users do: a real subprocess, its own local MLflow store unless given one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def run_job(name: str, args: list[str], cwd: Path, tracking_uri: str | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri or f"sqlite:///{cwd / 'mlflow.db'}"
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(REPO / "platform") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
