"""HTTP(S) connections pinned to a checked address, and a keep-alive pool of them.

A connection is opened to the address the safety policy already approved (the host name is
never re-resolved by the socket layer), so a DNS answer cannot change between the check and
the connect. The pool keys connections by (scheme, host, port, address): a connection is
only ever reused for a request whose URL passed the same checks and resolved to the same
address. img2dataset's urllib opens a new TCP (and TLS) connection for every image; reusing
one per host saves the handshakes and, on the server, a new connection per image.

A connection goes back to the pool only after a 200 whose body was read to the end within
the deadline, whose server did not ask to close and sent nothing past its Content-Length
(`bytes_follow`: such bytes would be read as the start of the next response, another URL's
answer); everything else is closed. Idle connections are dropped after `idle_s` (servers
close them on their side too), and so is one with anything to read when it is taken again:
late bytes past a body, or the server's close. When a reused
connection turns out to have been closed by the server (`STALE_ERRORS`), the caller drops it
and sends the GET on the next idle one or a new one, as HTTP clients do for an idempotent
request; only a failure on a new connection counts as the attempt's failure.
"""

from __future__ import annotations

import collections
import functools
import http.client
import select
import socket
import ssl
import threading
import time



@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying context per process, made on first use (loading CA certificates costs ms)."""
    return ssl.create_default_context()


#: Errors a request on a reused connection raises when the server had closed it while idle.
STALE_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)

PoolKey = tuple[str, str, int, str]   # (scheme, host, port, address)


class PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the already-checked address, never re-resolving the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to the already-checked address; the certificate is checked against the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=_ssl_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = _ssl_context().wrap_socket(sock, server_hostname=self.host)


def bytes_follow(response: http.client.HTTPResponse, sock: socket.socket | None) -> bool:
    """Whether anything follows the response's body: in its read buffer or on the socket (no wait)."""
    if sock is None:
        return True
    if response.fp is not None:  # its buffer may hold bytes read past the body
        sock.settimeout(0.0)     # a peek that finds the buffer empty reads the socket: never wait
        try:
            if response.fp.peek(1):
                return True
        except ssl.SSLWantReadError:  # TLS: no record waiting
            pass
        except OSError:
            return True
    return has_input(sock)


def has_input(sock: socket.socket) -> bool:
    """Data or an EOF is waiting on the socket (or decrypted in its TLS buffer)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def open_connection(key: PoolKey, timeout: float) -> http.client.HTTPConnection:
    scheme, host, port, address = key
    cls = PinnedHTTPSConnection if scheme == "https" else PinnedHTTPConnection
    return cls(host, port, address, timeout=timeout)


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port, address); thread-safe.

    `take` hands a connection to one caller only; `give` returns it (or closes it when the
    pool is disabled or already holds `max_idle` for that key).
    """

    def __init__(self, max_idle: int, idle_s: float = 30.0, enabled: bool = True) -> None:
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.enabled = enabled
        self._idle: dict[PoolKey, collections.deque[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()
        self.opened = 0   # connections opened (a test and the stats read it)
        self.reused = 0   # idle connections handed out again

    def take(self, key: PoolKey, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """(connection, reused): an idle one for `key` when there is one, else a new one."""
        stale: list[http.client.HTTPConnection] = []
        conn = None
        with self._lock:
            idle = self._idle.get(key)
            now = time.monotonic()
            while idle and conn is None:
                since, candidate = idle.pop()   # most recently used first: least likely closed
                if now - since > self.idle_s or candidate.sock is None or has_input(candidate.sock):
                    stale.append(candidate)
                else:
                    conn = candidate
            if conn is not None:
                self.reused += 1
            else:
                self.opened += 1
        for old in stale:
            old.close()
        if conn is None:
            return open_connection(key, timeout), False
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn, True

    def give(self, key: PoolKey, conn: http.client.HTTPConnection) -> None:
        if self.enabled and conn.sock is not None:
            with self._lock:
                idle = self._idle.setdefault(key, collections.deque())
                if len(idle) < self.max_idle:
                    idle.append((time.monotonic(), conn))
                    return
        conn.close()
