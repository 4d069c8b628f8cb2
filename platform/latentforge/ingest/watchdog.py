"""One thread that runs callbacks at deadlines: what ends a download whose time is up.

A request's deadline must fire while its thread is blocked in a socket read, so something
else has to shut the socket down; one thread with a heap of deadlines does it for every
request in the process (cheaper than a Timer thread per request). It starts on first use.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable


class Watchdog:
    """One thread that runs callbacks at deadlines (cheaper than a Timer thread per request)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def schedule(self, when: float, callback: Callable[[], None]) -> int:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lf-deadline", daemon=True)
                self._thread.start()
            ident = next(self._ids)
            heapq.heappush(self._heap, (when, ident, callback))
            if self._heap[0][1] == ident:  # only an earlier deadline changes how long the loop sleeps
                self._cond.notify()
            return ident

    def cancel(self, ident: int) -> None:
        with self._cond:
            self._cancelled.add(ident)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] in self._cancelled:
                    self._cancelled.discard(heapq.heappop(self._heap)[1])
                if not self._heap:
                    self._cond.wait(1.0)
                    continue
                when, ident, callback = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            try:
                callback()
            except Exception:  # noqa: BLE001 - a failed shutdown of a dead socket is fine
                pass


WATCHDOG = Watchdog()
