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


def init_ray(num_cpus: int | None = None, trains: bool = False, **kwargs: Any) -> str:
    """Attach to `RAY_ADDRESS` (set by `ray job submit` or the user), else start a local Ray.

    Returns a short description of where the job runs, for the stage's summary. The local
    default uses `address="local"` so a stray cluster on the machine is never joined by
    accident, and starts no dashboard (a new user needs none for a first run); `trains` says the
    job runs Ray Train, whose placement-group cleaner then needs muting (`quiet_placement_group_cleaner`).
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
        if trains:  # only then: a set-up hook keeps the job's workers out of Ray's prestarted pool (~1.5 s)
            kwargs["runtime_env"] = {"worker_process_setup_hook": quiet_placement_group_cleaner,
                                     **kwargs.get("runtime_env", {})}
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        where = "embedded local Ray"
    # Registered after Ray's own exit hook, so it runs first: Ray's hook sleeps 0.5 s before
    # disconnecting (for worker log lines still in flight), which every job would pay at exit;
    # the stage's results are all in by then. Ray's hook then finds nothing left to do.
    atexit.register(ray.shutdown)
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    return where


def quiet_placement_group_cleaner() -> None:
    """Worker set-up of the embedded Ray: Ray Train's placement-group cleaner asks the State API,
    which lives in the dashboard, once a second whether the training controller is alive, and
    warns on each failed query. The embedded Ray has no dashboard, so that is one warning a
    second for the whole training. Nothing is lost by muting it: the embedded cluster ends with
    the job, placement groups included."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
