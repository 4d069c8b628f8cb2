"""One tiny end-to-end demo run (jobs/demo.py --preset smoke) against a real MLflow server.

Shared by the demo pipeline test and the MLflow UI test (a session fixture in conftest.py), so
the expensive part runs once. It runs `jobs/demo.py` as a subprocess exactly as `make demo`
does, only with the smoke preset's sizes and MLFLOW_TRACKING_URI pointing at the test server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.harness.ray_head import venv_env

REPO = Path(__file__).resolve().parents[2]


@dataclass
class DemoRun:
    out: Path
    summary: dict
    log: str
    tracking_uri: str


def run_smoke_demo(root: Path, tracking_uri: str, timeout_s: float = 2400, *extra: str) -> DemoRun:
    out = root / "demo_output"
    # A busy CI machine can be slow to register the embedded Ray's raylet; give it time.
    env = venv_env(MLFLOW_TRACKING_URI=tracking_uri, RAY_raylet_start_wait_time_s="120")
    for key in ("RAY_ADDRESS", "LATENTFORGE_PIPELINE_RUN_ID"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "demo.py"), "--preset", "smoke", "--out", str(out),
                           *extra], cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    log = proc.stdout + proc.stderr
    (root / "demo.log").write_text(log)
    if proc.returncode != 0:
        raise AssertionError(f"demo exited {proc.returncode}:\n{log[-6000:]}")
    return DemoRun(out=out, summary=json.loads((out / "summary.json").read_text()), log=proc.stdout,
                   tracking_uri=tracking_uri)
