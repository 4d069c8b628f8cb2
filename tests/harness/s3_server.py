"""A real S3 server for the tests: `moto_server` on 127.0.0.1, as s3fs's own suite runs it.

The endpoint and credentials reach every client through the standard variables only
(AWS_ENDPOINT_URL and the credential chain's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), set
for the whole session before anything starts a Ray worker, so jobs, Ray workers and pyarrow see
exactly what a user's MinIO or R2 set-up gives them. The server itself starts on first use.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.harness.mlflow_server import stop_process_group
from tests.harness.ray_head import VENV_BIN, free_port, venv_env


def s3_env(port: int) -> dict[str, str]:
    """The standard AWS variables that point every S3 client at the test server on `port`."""
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def isolate_s3(port: int | None = None) -> int:
    """Set `s3_env` in this process (before ray is imported); drops the user's AWS profile settings."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(name, None)
    port = port or free_port()
    os.environ.update(s3_env(port))
    return port


@dataclass
class S3Server:
    root: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> "S3Server":
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "moto_server.log", "wb")
        self.process = subprocess.Popen([f"{VENV_BIN}/moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=log, stderr=subprocess.STDOUT, env=venv_env(),
                                        start_new_session=True, cwd=self.root)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited: {(self.root / 'moto_server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"moto_server not ready in {timeout_s}s")

    def make_bucket(self, name: str) -> str:
        """A new empty bucket; returns its s3:// URI."""
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        stop_process_group(self.process)
