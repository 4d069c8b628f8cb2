"""One tiny end-to-end demo run (jobs/demo.py --preset smoke) against a real MLflow server.

Shared by the demo pipeline test and the MLflow UI test (a session fixture in conftest.py), so
the expensive part runs once. It runs `jobs/demo.py` as a subprocess exactly as `make demo`
does, only with the smoke preset's sizes and MLFLOW_TRACKING_URI pointing at the test server, in a fresh
working directory with a fresh TMPDIR (tests/test_temp_files.py checks both are left as found).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
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
    temp: Path
    """The TMPDIR the demo and its Ray workers ran with: fresh before the run."""
    cwd: Path
    """The working directory the demo ran in: fresh before the run."""


def run_smoke_demo(root: Path, tracking_uri: str, timeout_s: float = 2400) -> DemoRun:
    out, temp, cwd = root / "demo_output", root / "tmp", root / "work"
    temp.mkdir()
    cwd.mkdir()
    # Ray's session files go to RAY_TMPDIR (short: its socket paths must fit 107 bytes), not TMPDIR;
    # a busy CI machine can be slow to register the embedded Ray's raylet, so give it time.
    ray_tmp = tempfile.mkdtemp(prefix="lfray", dir="/tmp")
    env = venv_env(MLFLOW_TRACKING_URI=tracking_uri, TMPDIR=str(temp), RAY_TMPDIR=ray_tmp,
                   RAY_raylet_start_wait_time_s="120")
    for key in ("RAY_ADDRESS", "LATENTFORGE_PIPELINE_RUN_ID"):
        env.pop(key, None)
    try:
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / "demo.py"), "--preset", "smoke", "--out", str(out)],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = proc.stdout + proc.stderr
    (root / "demo.log").write_text(log)
    if proc.returncode != 0:
        raise AssertionError(f"demo exited {proc.returncode}:\n{log[-6000:]}")
    return DemoRun(out=out, summary=json.loads((out / "summary.json").read_text()), log=proc.stdout,
                   tracking_uri=tracking_uri, temp=temp, cwd=cwd)
