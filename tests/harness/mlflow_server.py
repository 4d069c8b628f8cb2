"""A real `mlflow server` on 127.0.0.1 with a sqlite store and a local artifact root, on a free port.

Started in its own process group so teardown stops exactly this server (and its uvicorn
workers); the tests point jobs at it with MLFLOW_TRACKING_URI = `server.url`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.ray_head import VENV_BIN, free_port, venv_env


@dataclass
class MlflowServer:
    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.root / "artifacts"

    @property
    def log_path(self) -> Path:
        return self.root / "mlflow_server.log"

    def command(self) -> list[str]:
        return [
            f"{VENV_BIN}/mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", self.backend_store_uri,
            "--default-artifact-root", self.artifact_root.as_uri(), "--workers", "1",
        ]

    def start(self, timeout_s: float = 240) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env=venv_env(MLFLOW_ENABLE_TELEMETRY="false", MLFLOW_DISABLE_TELEMETRY="true"),
                                        start_new_session=True, cwd=self.root)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server not ready in {timeout_s}s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process_group(self.process)


def stop_process_group(process: subprocess.Popen | None) -> None:
    """SIGTERM a server started with `start_new_session=True` and its children; SIGKILL after 30 s."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
