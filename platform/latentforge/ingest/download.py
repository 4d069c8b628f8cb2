"""Fetch one URL: total deadline, size cap, safe redirects, retries, per-host cap, opt-outs.

The deadline is wall-clock for the whole request: every attempt, the backoff waits between
them, and in each attempt DNS, connect, headers, every redirect hop and the body. A watchdog
thread shuts the socket down when it passes, so a server that drips one byte a second cannot
hold a download thread longer than `timeout_s` (a per-read socket timeout alone would never
fire against such a server), and no retry starts whose backoff would end past it. The clock
starts when the request first holds a slot of its host (`max_per_host`): waiting behind this
process's own requests to a busy host is not the host being slow.

Every hop holds a slot of its own host while it runs, so a redirect target gets no more
concurrent requests than `max_per_host` however many hosts redirect to it. A host name's
checked addresses are tried in turn until one takes the connection.

The body is streamed in 64 KiB reads into a buffer that is refused as soon as it passes
`max_bytes`, whatever Content-Length claimed, so memory stays bounded per download.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urljoin

from latentforge.ingest.config import IngestConfig
from latentforge.ingest.connections import STALE_ERRORS, ConnectionPool, PoolKey, bytes_follow
from latentforge.ingest.safety import AddressPolicy, BlockedURL, IPAddress, ResolveError, Target
from latentforge.ingest.watchdog import WATCHDOG

READ_CHUNK = 64 * 1024
REDIRECT_CODES = (301, 302, 303, 307, 308)
RETRYABLE = ("connection", "http_5xx", "http_429")  # not timeout: the deadline covers the whole request
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"


_OPT_OUT_DEFAULT = next(f for f in fields(IngestConfig) if f.name == "opt_out_directives").default_factory()


@dataclass
class FetchSettings:
    """The download knobs of `IngestConfig` (same names and defaults, documented there)."""

    timeout_s: float = IngestConfig.timeout_s
    max_bytes: int = IngestConfig.max_bytes
    retries: int = IngestConfig.retries
    backoff_s: float = IngestConfig.backoff_s
    backoff_max_s: float = IngestConfig.backoff_max_s
    max_retry_after_s: float = IngestConfig.max_retry_after_s
    max_redirects: int = IngestConfig.max_redirects
    max_per_host: int = IngestConfig.max_per_host
    reuse_connections: bool = IngestConfig.reuse_connections
    user_agent_token: str = IngestConfig.user_agent_token
    honor_opt_out: bool = IngestConfig.honor_opt_out
    opt_out_directives: tuple[str, ...] = tuple(_OPT_OUT_DEFAULT)

    @classmethod
    def from_config(cls, config: Any) -> "FetchSettings":
        values = {f.name: getattr(config, f.name) for f in fields(cls)}
        return cls(**{**values, "opt_out_directives": tuple(values["opt_out_directives"])})

    @property
    def user_agent(self) -> str:
        token = self.user_agent_token.strip()
        return f"{BROWSER_UA} (compatible; {token}; +https://github.com/latentforge)" if token else BROWSER_UA


@dataclass
class FetchResult:
    """Outcome of fetching one URL (after retries)."""

    status: str                 # "ok" or a reason code (see ingest.config.STATUSES)
    data: bytes | None = None
    http_status: int | None = None
    error: str = ""
    final_url: str = ""
    attempts: int = 0
    content_type: str = ""
    seconds: float = 0.0


class _Failure(Exception):
    def __init__(self, reason: str, message: str, http_status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.http_status = http_status
        self.retry_after = retry_after


# --------------------------------------------------------------------------- deadline
class _Deadline:
    """Wall-clock budget of one request from `start()` on; kills the registered socket when it runs out."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end: float | None = None
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._ident: int | None = None

    @property
    def started(self) -> bool:
        return self.end is not None

    def start(self) -> None:
        if self.end is None:
            self.end = time.monotonic() + self.seconds
            self._ident = WATCHDOG.schedule(self.end, self._fire)

    def remaining(self) -> float:
        return self.seconds if self.end is None else self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.expired or self.remaining() <= 0:
            raise _Failure("timeout", f"deadline passed during {what}")

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.expired and sock is not None:
                _kill(sock)

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                _kill(self._sock)

    def close(self) -> None:
        if self._ident is not None:
            WATCHDOG.cancel(self._ident)


def _kill(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def is_opted_out(header_values: Iterable[str], user_agent_token: str, directives: Iterable[str]) -> bool:
    """X-Robots-Tag: `noai`, or `ourbot: noimageai`; directives for other bots are ignored."""
    wanted = {d.lower() for d in directives}
    token = user_agent_token.strip().lower()
    for value in header_values:
        head, sep, rest = value.partition(":")
        if sep and head.strip() and "," not in head and " " not in head.strip():
            bot, listed = head.strip().lower(), rest
            if bot != token:
                continue
        else:
            listed = value
        if any(d.strip().lower() in wanted for d in listed.split(",")):
            return True
    return False


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


# --------------------------------------------------------------------------- fetcher
class Fetcher:
    """Thread-safe fetcher; one per worker process (the per-host cap is shared by its threads)."""

    def __init__(self, settings: FetchSettings, policy: AddressPolicy,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.policy = policy
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self.connections = ConnectionPool(settings.max_per_host, enabled=settings.reuse_connections)
        self._headers = {"User-Agent": settings.user_agent, "Accept": "image/*,*/*;q=0.8",
                         "Accept-Encoding": "identity"}
        if not settings.reuse_connections:
            self._headers["Connection"] = "close"

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            slot = self._host_slots.get(host)
            if slot is None:
                slot = self._host_slots[host] = threading.BoundedSemaphore(self.settings.max_per_host)
            return slot

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter; a Retry-After asks for at least that long."""
        s = self.settings
        delay = min(s.backoff_max_s, s.backoff_s * (2 ** attempt)) * (0.5 + self._rng.random())
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def fetch(self, url: str) -> FetchResult:
        deadline = _Deadline(self.settings.timeout_s)
        try:
            return self._fetch(url, deadline, time.monotonic())
        finally:
            deadline.close()

    def _fetch(self, url: str, deadline: _Deadline, start: float) -> FetchResult:
        attempt = 0
        while True:
            attempt += 1
            try:
                data, http_status, final_url, ctype = self._attempt(url, deadline)
                return FetchResult("ok", data=data, http_status=http_status, final_url=final_url,
                                   attempts=attempt, content_type=ctype, seconds=time.monotonic() - start)
            except (BlockedURL, ResolveError) as exc:
                return FetchResult(exc.reason, error=str(exc), attempts=attempt, seconds=time.monotonic() - start)
            except _Failure as exc:
                delay = self._retry_delay(exc, attempt, deadline)
                if delay is not None:
                    self._sleep(delay)
                    continue
                return FetchResult("http_4xx" if exc.reason == "http_429" else exc.reason, http_status=exc.http_status,
                                   error=str(exc)[:500], attempts=attempt, seconds=time.monotonic() - start)

    def _retry_delay(self, exc: _Failure, attempt: int, deadline: _Deadline) -> float | None:
        """The wait before another attempt; None when there is none: the failure is final, the
        retries are used up, or the wait would end past the request's deadline."""
        s = self.settings
        if exc.reason not in RETRYABLE or attempt > s.retries:
            return None
        if exc.retry_after is not None and exc.retry_after > s.max_retry_after_s:
            return None
        delay = self.backoff(attempt - 1, exc.retry_after)
        return delay if delay < deadline.remaining() else None

    def _attempt(self, url: str, deadline: _Deadline) -> tuple[bytes, int, str, str]:
        s = self.settings
        target = self.policy.check_url(url)
        for _hop in range(s.max_redirects + 1):
            with self._holding_slot(target, deadline):
                location, result = self._hop(target, deadline)
            if result is not None:
                return result
            assert location is not None
            target = self.policy.check_url(urljoin(target.url, location))
        raise _Failure("too_many_redirects", f"more than {s.max_redirects} redirects")

    @contextlib.contextmanager
    def _holding_slot(self, target: Target, deadline: _Deadline) -> Iterator[None]:
        """Hold one of the `max_per_host` slots of this hop's host; the first one held starts the clock."""
        slot = self._slot(f"{target.host}:{target.port}")
        if not slot.acquire(timeout=max(deadline.remaining(), 0.0) if deadline.started else None):
            raise _Failure("timeout", f"deadline passed waiting for a free slot of {target.host}")
        try:
            deadline.start()
            yield
        finally:
            slot.release()

    def _hop(self, target: Target, deadline: _Deadline) -> tuple[str | None, tuple[bytes, int, str, str] | None]:
        s = self.settings
        deadline.check("DNS")
        addresses = self.policy.resolve(target, deadline.remaining())
        deadline.check("DNS")
        key, conn, response = self._send_any(target, addresses, deadline)
        keep = False
        try:
            status = response.status
            if status in REDIRECT_CODES:
                location = response.getheader("Location")
                if not location:
                    raise _Failure("http_other", f"HTTP {status} without Location", status)
                return location, None
            if status != 200:
                raise _status_failure(status, response)
            if s.honor_opt_out and is_opted_out(response.headers.get_all("X-Robots-Tag") or [],
                                                s.user_agent_token, s.opt_out_directives):
                raise _Failure("opt_out", "X-Robots-Tag opts out of AI use", status)
            declared = response.getheader("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > s.max_bytes:
                raise _Failure("too_large", f"Content-Length {declared} > max_bytes {s.max_bytes}", status)
            body = self._read_body(response, deadline, status)
            if declared is not None and declared.strip().isdigit() and len(body) < int(declared):
                raise _Failure("connection", f"body ended after {len(body)} of {declared} bytes", status)
            # Bytes past the body would be read as the start of the next response on this connection.
            keep = not response.will_close and not deadline.expired and not bytes_follow(response, conn.sock)
            response.close()  # read to its end: releases the connection for the next request (read1 does not)
            return None, (body, status, target.url, response.getheader("Content-Type") or "")
        finally:
            deadline.watch(None)
            if keep:
                self.connections.give(key, conn)
            else:
                conn.close()

    def _send_any(self, target: Target, addresses: list[IPAddress],
                  deadline: _Deadline) -> tuple[PoolKey, http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the GET to the name's checked addresses in turn until one answers (one refusing or
        unreachable is no reason to give up on the host); a timeout ends the search: the time is up."""
        failure: _Failure | None = None
        for address in addresses:
            key: PoolKey = (target.scheme, target.host, target.port, str(address))
            try:
                return (key, *self._send(key, target, deadline))
            except _Failure as exc:
                if exc.reason == "timeout":
                    raise
                failure = exc
        assert failure is not None  # resolve() returns at least one address
        raise failure

    def _send(self, key: PoolKey, target: Target,
              deadline: _Deadline) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the GET and read the response headers. A kept-alive connection that the server
        closed while it sat idle is dropped and the GET (not served) goes out on the next idle
        one or a new one; the pool holds at most `max_per_host`, so this ends."""
        while True:
            conn, reused = self.connections.take(key, max(deadline.remaining(), 0.001))
            try:
                if conn.sock is None:
                    conn.connect()
                deadline.watch(conn.sock)
                conn.request("GET", target.path, headers=self._headers)
                return conn, conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                deadline.watch(None)
                if reused and isinstance(exc, STALE_ERRORS) and not deadline.expired:
                    continue
                raise _request_failure(exc, deadline) from exc

    def _read_body(self, response: http.client.HTTPResponse, deadline: _Deadline, status: int) -> bytes:
        limit = self.settings.max_bytes
        buffer = bytearray()
        try:
            while True:
                chunk = response.read(READ_CHUNK) if response.chunked else response.read1(READ_CHUNK)
                if not chunk:
                    break
                buffer += chunk
                if len(buffer) > limit:
                    raise _Failure("too_large", f"body passed max_bytes {limit}", status)
                deadline.check("the body")
        except _Failure:
            raise
        except (OSError, ValueError, http.client.HTTPException) as exc:
            if deadline.expired or deadline.remaining() <= 0:
                raise _Failure("timeout", f"deadline passed after {len(buffer)} body bytes", status) from exc
            if isinstance(exc, http.client.IncompleteRead):
                raise _Failure("connection", f"body ended early ({len(buffer)} bytes)", status) from exc
            raise _Failure("connection", f"{type(exc).__name__}: {exc}", status) from exc
        deadline.check("the body")
        return bytes(buffer)


def _request_failure(exc: BaseException, deadline: _Deadline) -> _Failure:
    """The reason code of a failure before the response headers arrived."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return _Failure("timeout", f"timed out: {exc}")
    if deadline.expired or deadline.remaining() <= 0:
        return _Failure("timeout", "deadline passed before the headers arrived")
    if isinstance(exc, ssl.SSLError):
        return _Failure("connection", f"TLS error: {exc}")
    return _Failure("connection", f"{type(exc).__name__}: {exc}")


def _status_failure(status: int, response: http.client.HTTPResponse) -> _Failure:
    """The reason code of a non-200, non-redirect status (Retry-After kept for 429/503)."""
    retry_after = parse_retry_after(response.getheader("Retry-After")) if status in (429, 503) else None
    if status == 429:
        return _Failure("http_429", "HTTP 429", status, retry_after)
    if 400 <= status < 500:
        return _Failure("http_4xx", f"HTTP {status}", status)
    if 500 <= status < 600:
        return _Failure("http_5xx", f"HTTP {status}", status, retry_after)
    return _Failure("http_other", f"HTTP {status}", status)
