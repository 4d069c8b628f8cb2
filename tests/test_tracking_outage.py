"""A tracking outage mid-run, for real: a dedicated `mlflow server` is stopped and started again.

The metrics the server could not take are counted as dropped (exactly those), a warning fires
while the outage lasts (not only at the end), and logging resumes when the server is back.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from latentforge import tracking
from latentforge.tracking import AsyncMetricLogger, StageRun
from tests.harness.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow


def _wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _steps(run: StageRun, key: str) -> list[int]:
    return sorted(m.step for m in run.client.get_metric_history(run.run_id, key))


def test_metrics_lost_in_an_outage_are_counted_and_warned_while_it_lasts(tmp_path, monkeypatch, caplog) -> None:
    # No client-side retries, so the outage is seen within the test's time (the default retries
    # for minutes first; the counting is the same).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, "outage-test")
    monkeypatch.delenv(tracking.PIPELINE_RUN_ENV, raising=False)
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        caplog.set_level(logging.WARNING, logger="latentforge.tracking")
        with StageRun("train", run_name="outage") as run:
            assert run.active
            metrics = AsyncMetricLogger(run, interval_s=0.2)
            metrics.log({"loss": 1.0, "lr": 0.1}, step=1)
            _wait_for(lambda: _steps(run, "loss") == [1])

            server.stop()
            metrics.log({"loss": 2.0, "lr": 0.2}, step=2)
            metrics.log({"loss": 3.0}, step=3)
            _wait_for(lambda: metrics.dropped == 3)
            assert any("did not take" in r.getMessage() for r in caplog.records)  # during the outage

            server = MlflowServer(server.root, port=server.port).start()  # same store, same URL
            metrics.log({"loss": 4.0, "lr": 0.4}, step=4)
            metrics.close()
        assert metrics.dropped == 3
        assert _steps(run, "loss") == [1, 4] and _steps(run, "lr") == [1, 4]
        assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()


def test_close_gives_up_on_a_server_that_never_answers(tmp_path, monkeypatch) -> None:
    """The final flush is bounded: what is left after the timeout counts as dropped, nothing hangs."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        with StageRun("train", run_name="stalled") as run:
            os.killpg(server.process.pid, signal.SIGSTOP)  # connections hang instead of being refused
            try:
                metrics = AsyncMetricLogger(run, interval_s=60.0)
                for step in range(5):
                    metrics.log({"loss": float(step)}, step=step)
                started = time.monotonic()
                metrics.close(timeout_s=2.0)
                assert time.monotonic() - started < 5.0
                assert metrics.dropped == 5
            finally:
                os.killpg(server.process.pid, signal.SIGCONT)  # so that stop() can end it
    finally:
        server.stop()
