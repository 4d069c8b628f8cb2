"""A test session that sees what a fresh machine sees: its own HOME and its own Ray token.

Ray 2.60's `ray start --head` turns token authentication on and fails on a machine where no
token exists yet ("Token authentication is enabled but no authentication token was found");
`~/.ray/auth_token` only appears once some embedded `ray.init()` has written it, and two Ray
instances that share that file can rewrite it under each other. So the harness never relies on
the user's home: every Ray process of the session (heads, embedded drivers, `ray job submit`,
the multi-host namespaces) reads one token written here, through RAY_AUTH_TOKEN_PATH, and HOME
(with it ~/.cache, ~/.ray, MLflow's and Hugging Face's defaults) points at an empty directory
of the session's own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

TOKEN_FILE = "ray_auth_token"


def write_token(path: Path) -> Path:
    """A fresh Ray auth token (64 hex characters, as `ray get-auth-token --generate` makes), owner-only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def isolated_env(root: Path) -> dict[str, str]:
    """Environment variables that give a process tree `root/home` as HOME and its own Ray token."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    token = write_token(root / TOKEN_FILE)
    return {"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def isolate_session() -> Path:
    """Apply `isolated_env` to this process (before anything imports ray); returns the session's root.

    Variables that name the user's cache or config directories are dropped so they fall back under
    the new HOME; RAY_AUTH_TOKEN would override the token file and is dropped too.
    """
    root = Path(tempfile.mkdtemp(prefix="lf-test-session-"))
    for name in ("RAY_AUTH_TOKEN", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "HF_HOME",
                 "TORCH_HOME", "MLFLOW_TRACKING_URI"):
        os.environ.pop(name, None)
    os.environ.update(isolated_env(root))
    return root


def remove_session(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
