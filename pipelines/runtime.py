"""Connecting a job to Ray: the real cluster when an address is given, else an embedded one."""

from __future__ import annotations

import logging
import os
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
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return f"Ray cluster at {address}"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return "embedded local Ray"
