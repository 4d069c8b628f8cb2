"""The one exit-code contract every job runs under (`jobs/_bootstrap.run_job`): 0 done, 1 stage
failure, 2 usage/config, 128+signal on SIGINT/SIGTERM; the SIGTERM handler is the job's only
while it runs, and a job run from a thread (tests, the demo) works without one."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

from jobs import _bootstrap


def _done() -> SimpleNamespace:
    return SimpleNamespace(summary="all done")


def _raise(exc: BaseException):
    def work() -> None:
        raise exc
    return work


def test_exit_codes_and_one_line_messages(capsys) -> None:
    assert _bootstrap.run_job("stage", _done) == 0
    assert capsys.readouterr().out.strip() == "all done"
    assert _bootstrap.run_job("stage", _raise(ValueError("bad flag"))) == 2
    assert capsys.readouterr().err.strip() == "stage: bad flag"
    assert _bootstrap.run_job("stage", _raise(RuntimeError("boom")), usage_errors=(KeyError,)) == 1
    assert capsys.readouterr().err.strip() == "stage: failed: RuntimeError: boom"
    assert _bootstrap.run_job("stage", _raise(KeyboardInterrupt()), interrupted="rerun to resume") == 130
    assert capsys.readouterr().err.strip() == "stage: rerun to resume (stopped by SIGINT)"
    # A stage that handles the signals itself (ingest) reports the one it got.
    assert _bootstrap.run_job("stage", _raise(KeyboardInterrupt(int(signal.SIGTERM)))) == 143
    assert "(stopped by SIGTERM)" in capsys.readouterr().err


def test_sigterm_while_running_exits_143_and_the_previous_handler_is_restored(capsys) -> None:
    def previous(signum, frame) -> None:
        raise AssertionError("the job's handler must be the one installed while it runs")

    before = signal.signal(signal.SIGTERM, previous)
    try:
        def work() -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler's KeyboardInterrupt ends this at once
        assert _bootstrap.run_job("stage", work) == 143
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_job_run_from_a_thread_works_without_taking_over_signals() -> None:
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", _bootstrap.run_job("stage", _done)))
    thread.start()
    thread.join(timeout=30)
    assert result == {"rc": 0}
