"""`make mlflow` as the user runs it: infra/mlflow/serve_local.sh on a free port over a given store."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.harness.ray_head import free_port, venv_env

SCRIPT = Path(__file__).resolve().parent.parent.parent / "infra" / "mlflow" / "serve_local.sh"


class ServeLocal:
    """The script in its own process group (it execs `mlflow server`, which forks workers)."""

    def __init__(self, store: Path, timeout_s: float = 240) -> None:
        self.store, self.port = store, free_port()
        env = venv_env(MLFLOW_PORT=str(self.port), MLFLOW_STORE=str(store))
        self.process = subprocess.Popen(["bash", str(SCRIPT)], env=env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_healthy(timeout_s)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve_local.sh exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"serve_local.sh: no server in {timeout_s} s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: uvicorn's graceful shutdown can take longer
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
