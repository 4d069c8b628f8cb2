"""The shared Ray fixtures really start a cluster that runs work, also on a machine that never ran Ray."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.isolation import isolated_env

REPO = Path(__file__).resolve().parent.parent

# The session fixture's own code (tests/conftest.py ray_head + ray_session), in a fresh interpreter.
FRESH_MACHINE_PROBE = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.harness.ray_head import RayHead
head = RayHead(temp_dir=Path({temp!r})).start()
try:
    import ray
    ray.init(address=head.address, log_to_driver=False)
    print(json.dumps({{"squares": ray.get([ray.remote(lambda x: x * x).remote(i) for i in range(3)])}}))
    ray.shutdown()
finally:
    head.stop()
"""


@pytest.mark.slow
def test_ray_head_runs_tasks(ray_session) -> None:
    ray = ray_session

    @ray.remote
    def square(x: int) -> int:
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    assert ray.cluster_resources().get("CPU") == 2


def test_session_uses_its_own_home_and_token() -> None:
    """conftest's isolation is in force: no test reads or writes the user's home or ~/.ray."""
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert token.is_file() and len(token.read_text()) == 64
    assert "RAY_AUTH_TOKEN" not in os.environ
    assert Path(os.environ["HOME"]).parent == token.parent  # both under the session's temp root


@pytest.mark.slow
def test_ray_head_fixture_starts_with_an_empty_home(tmp_path: Path) -> None:
    """A machine that has never run Ray: HOME is empty, no ~/.ray/auth_token exists anywhere it looks.

    The head must start with the harness's own token and leave the empty HOME empty."""
    env = {**os.environ, **isolated_env(tmp_path / "fresh")}
    home = Path(env["HOME"])
    assert not any(home.iterdir())
    temp = Path("/tmp") / f"lf-ray-fresh-{os.getpid()}"  # short: AF_UNIX socket paths
    probe = FRESH_MACHINE_PROBE.format(repo=str(REPO), temp=str(temp))
    try:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"squares": [0, 1, 4]}
    assert sorted(p.name for p in home.iterdir()) == [], "the Ray head wrote under HOME"
