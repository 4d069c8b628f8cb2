"""Session-wide fixtures: one real local Ray head, one in-process Ray driver attached to it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
sys.path.insert(0, str(REPO_ROOT))  # `tests.harness` and `jobs` for the tests

from tests.harness.isolation import isolate_session, remove_session  # noqa: E402

# The session's own HOME and Ray token (tests/harness/isolation.py): a fresh machine has no
# ~/.ray/auth_token, and no test may read or write the user's home. Ray reads the auth variables
# once, at import: this runs before anything imports ray.
SESSION_ROOT = isolate_session()

from tests.harness.s3_server import isolate_s3  # noqa: E402

# The S3 server's endpoint and credentials, through the standard AWS variables, are set before
# any Ray process starts, so Ray workers inherit them as they would a user's; the server itself
# starts on first use (the `s3_server` fixture).
S3_PORT = isolate_s3()

from tests.harness.ray_head import RayHead  # noqa: E402


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    """A `ray start --head` cluster on 127.0.0.1 for the whole session (2 CPUs)."""
    # A short temp dir: Ray's socket paths must stay under the 107-byte AF_UNIX limit.
    temp_dir = Path(os.environ.get("LATENTFORGE_TEST_RAY_TMP", "/tmp")) / f"lf-ray-{os.getpid()}"
    head = RayHead(temp_dir=temp_dir).start()
    yield head
    head.stop()


@pytest.fixture(scope="session")
def ray_session(ray_head: RayHead):
    """This test process connected to `ray_head` as a driver (for in-process pipeline tests)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.address, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def laion_sample() -> Path:
    """The 10k real LAION rows from ../shared (skips when the checkout has no shared/)."""
    path = SHARED / "data" / "laion_sample_10000.parquet"
    if not path.exists():
        pytest.skip("../shared/data/laion_sample_10000.parquet is not present")
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (`moto_server` on 127.0.0.1) for the whole session, at AWS_ENDPOINT_URL."""
    from tests.harness.s3_server import S3Server

    server = S3Server(root=tmp_path_factory.mktemp("s3_server"), port=S3_PORT).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 (sqlite store, local artifact root) for the whole session."""
    from tests.harness.mlflow_server import MlflowServer

    server = MlflowServer(root=tmp_path_factory.mktemp("mlflow_server")).start()
    yield server
    server.stop()


# --- ingest harness (loopback HTTP servers, URL lists) -------------------------------------------
from tests.harness.http_server import LoopbackServer  # noqa: E402


@pytest.fixture
def http_server():
    """A fresh threaded loopback HTTP server on 127.0.0.1 (see tests/harness/http_server.py)."""
    with LoopbackServer("127.0.0.1") as server:
        yield server


@pytest.fixture
def second_server():
    """Another loopback server on 127.0.0.2: 'a different host' for redirect tests."""
    with LoopbackServer("127.0.0.2") as server:
        yield server


@pytest.fixture(scope="session")
def demo_smoke_run(mlflow_server, tmp_path_factory: pytest.TempPathFactory):
    """`jobs/demo.py --preset smoke` once per session, logging to `mlflow_server`."""
    from tests.harness.demo_run import run_smoke_demo

    return run_smoke_demo(tmp_path_factory.mktemp("demo_smoke"), mlflow_server.url)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tiny-model tests: a tiny UNet gains nothing from threads,
    and on a busy 2-core machine OpenMP spinning makes 2 threads ~100x slower than 1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- process exit ------------------------------------------------------------------------------------
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process with pytest's own status once everything is reported and every atexit hook
    (ray.shutdown among them) has run, skipping only the interpreter's finalisation: with native Ray /
    gRPC / torch threads still alive it once crashed (SIGSEGV after "574 passed"), turning a green
    session red."""
    if not _EXIT_STATUS:
        remove_session(SESSION_ROOT)
        return
    import atexit

    atexit._run_exitfuncs()
    remove_session(SESSION_ROOT)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
