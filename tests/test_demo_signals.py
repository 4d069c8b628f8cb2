"""`jobs/demo.py` stops under the jobs' one bootstrap (`jobs/_bootstrap.run_job`): Ctrl-C exits 130,
SIGTERM (`ray job stop`, Kubernetes) 143, each with the bootstrap's one line naming the signal, whether
the signal reaches the demo itself or a stage it is running."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.harness.ray_head import venv_env

REPO = Path(__file__).resolve().parents[1]
SMOKE_ROWS = yaml.safe_load((REPO / "jobs/configs/demo/smoke.yaml").read_text())["rows"]


def _interrupt_demo(tmp_path: Path, signum: int, when: str) -> tuple[int, str]:
    """Start the smoke demo, send `signum` once a stdout line starts with `when`; (exit code, stderr)."""
    ray_tmp = tempfile.mkdtemp(prefix="lfray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = venv_env(RAY_TMPDIR=ray_tmp, RAY_raylet_start_wait_time_s="120")
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LATENTFORGE_PIPELINE_RUN_ID"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "demo.py"), "--preset", "smoke", "--no-mlflow",
                             "--out", str(tmp_path / "demo_output")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(when):
                proc.send_signal(signum)
                break
        _, err = proc.communicate(timeout=300)
        assert any(line.startswith(when) for line in seen), "".join(seen)[-3000:] + err[-3000:]
        return proc.returncode, err
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["rm", "-rf", ray_tmp], check=False)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_demo_exits_128_plus_signal_with_the_bootstrap_line(tmp_path, signum) -> None:
    # Sent while the demo sets up (after its scenes, before or while Ray starts).
    code, err = _interrupt_demo(tmp_path, signum, f"demo: {SMOKE_ROWS} scenes")
    assert code == 128 + signum, err[-3000:]
    assert f"demo: interrupted; the next `make demo` starts afresh (stopped by {signum.name})" in err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_during_a_stage_stops_the_stage_and_the_demo_with_143(tmp_path) -> None:
    code, err = _interrupt_demo(tmp_path, signal.SIGTERM, "=== download_images")
    assert code == 143, err[-3000:]
    assert "(stopped by SIGTERM)" in err and "demo: interrupted" in err
    assert "demo: failed" not in err  # a stopped stage is a stop, not a stage failure
