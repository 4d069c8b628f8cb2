"""Make `pipelines` importable when a job runs as `python jobs/<stage>.py` from a checkout.

Python puts `jobs/` (not the repository root) on sys.path for a script; this adds the root,
which is also Ray's working dir after `ray job submit --working-dir .`.
"""

import sys
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS = REPO_ROOT / "jobs" / "configs"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def run_job(stage: str, work: Callable[[], Any], usage_errors: tuple[type[BaseException], ...] = (ValueError,),
            interrupted: str = "interrupted") -> int:
    """Run a stage with the jobs' shared exit-code contract and print its summary.

    0 done, 1 stage failure (one clear line; the traceback at debug level), 2 bad config or
    input (`usage_errors`), 128+signal on SIGINT/SIGTERM. SIGTERM (what `ray job stop` and
    Kubernetes send) is turned into the same KeyboardInterrupt path as Ctrl-C so the stage's
    own cleanup runs; a stage that handles the signals itself raises KeyboardInterrupt(signum).
    """
    import logging
    import signal

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (a test running the job in a thread): no signal to take over
        previous = None
    try:
        result = work()
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        print(f"{stage}: {interrupted} (stopped by {signal.Signals(signum).name})", file=sys.stderr)
        return 128 + int(signum)
    except usage_errors as exc:
        print(f"{stage}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line, exit 1
        logging.getLogger(stage).debug("failure", exc_info=True)
        print(f"{stage}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(result.summary)
    return 0
