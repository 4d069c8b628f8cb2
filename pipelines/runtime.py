"""Connecting a job to Ray: the real cluster when an address is given, else an embedded one."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from typing import Any

import ray

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, **kwargs: Any) -> str:
    """Attach to `RAY_ADDRESS` (set by `ray job submit` or the user), else start a local Ray.

    Returns a short description of where the job runs, for the stage's summary. The local
    default uses `address="local"` so a stray cluster on the machine is never joined by
    accident, and starts no dashboard (a new user needs none for a first run).
    """
    if ray.is_initialized():
        return "already-initialised Ray"
    # ray.init (in the main thread) replaces the SIGTERM handler with sys.exit(signum): a job's own
    # handler (jobs/_bootstrap.run_job: exit 143 after the stage's cleanup) is put back below.
    sigterm = signal.getsignal(signal.SIGTERM)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        where = f"Ray cluster at {address}"
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        where = "embedded local Ray"
    # Registered after Ray's own exit hook, so it runs first: Ray's hook sleeps 0.5 s before
    # disconnecting (for worker log lines still in flight), which every job would pay at exit;
    # the stage's results are all in by then. Ray's hook then finds nothing left to do.
    atexit.register(ray.shutdown)
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    return where
