"""A threaded loopback HTTP server that serves generated images and misbehaves on demand.

    server = LoopbackServer().start()
    url = server.route("/a.jpg", body=make_image("jpeg"))                 # 200 image/jpeg
    server.route("/gone", status=410)                                        # error codes
    server.route("/busy", fail_times=2, fail_status=429, retry_after="1")   # fail N times, then succeed
    server.route("/drip", drip=(1, 0.2))                                     # 1 byte every 0.2 s
    server.route("/r", redirect="http://127.0.0.2:PORT/x")                  # redirects (other hosts too)
    server.route("/big", huge=100 << 20)                                     # streamed, never in memory
    server.route("/liar", content_length=100)                                # a lying Content-Length
    server.route("/x", trailing=b"HTTP/1.1 200 ...", trailing_delay_s=0.1)   # bytes past the body, kept alive
    server.route("/x", headers={"X-Robots-Tag": "noai"})                    # arbitrary headers
    server.requests                                                          # every request seen
    server.connections                                                       # TCP connections accepted
    server.pool_url(i)                                                       # /pool/<i>.jpg, a pool of JPEGs

Every request is recorded (path, headers, time) so a test can assert that none arrived.
`make_image(kind)` builds the test images: jpeg, png, webp, gif, cmyk, palette, png16, rgba,
exif_rotated, grey, truncated, svg, html, empty, bomb (a real 50,000 x 50,000 1-bit PNG, ~300 KB).
"""

from __future__ import annotations

import functools
import io
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
from PIL import Image


# --------------------------------------------------------------------------- images
def _texture(width: int, height: int, seed: int, noise: float | None = None) -> np.ndarray:
    """A photo-like RGB array: smooth gradients plus noise (JPEGs of realistic size)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        127 + 100 * np.sin(x / (17 + seed % 13) + seed),
        127 + 100 * np.cos(y / (23 + seed % 7) - seed),
        127 + 100 * np.sin((x + y) / (31 + seed % 5)),
    ], axis=-1)
    sigma = 18 + seed % 10 if noise is None else noise
    return np.clip(base + rng.normal(0, sigma, size=(height, width, 3)), 0, 255).astype(np.uint8)


def jpeg_bytes(width: int = 320, height: int = 240, seed: int = 0, quality: int = 90,
               noise: float | None = None, **save: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(_texture(width, height, seed, noise)).save(out, "JPEG", quality=quality, **save)
    return out.getvalue()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A complete, valid 1-bit PNG of width x height zeros: ~300 KB on the wire, 2.5 G pixels decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    chunks = [comp.compress(row * 1000) for _ in range(height // 1000)]
    chunks.append(comp.compress(row * (height % 1000)))
    chunks.append(comp.flush())
    idat = b"".join(chunks)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@functools.lru_cache(maxsize=None)
def make_image(kind: str, width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    """Bytes of one test image (or non-image) of the given kind."""
    rgb = Image.fromarray(_texture(width, height, seed))
    if kind == "jpeg":
        return jpeg_bytes(width, height, seed)
    if kind == "png":
        return _png(rgb)
    if kind in ("webp", "gif", "bmp", "tiff"):
        out = io.BytesIO()
        rgb.save(out, kind.upper())
        return out.getvalue()
    if kind == "cmyk":
        out = io.BytesIO()
        rgb.convert("CMYK").save(out, "JPEG", quality=90)
        return out.getvalue()
    if kind == "grey":
        out = io.BytesIO()
        rgb.convert("L").save(out, "JPEG", quality=90)
        return out.getvalue()
    if kind == "palette":
        return _png(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    if kind == "png16":
        ramp = (np.linspace(0, 65535, width, dtype=np.uint32)[None, :].repeat(height, 0)).astype(np.uint16)
        return _png(Image.fromarray(ramp))  # uint16 -> mode I;16
    if kind == "rgba":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.new("L", rgb.size, 0))  # fully transparent: composites to white
        return _png(rgba)
    if kind == "exif_rotated":
        # Stored landscape (width x height), EXIF orientation 6: displayed as portrait.
        exif = Image.Exif()
        exif[0x0112] = 6
        out = io.BytesIO()
        rgb.save(out, "JPEG", quality=90, exif=exif.tobytes())
        return out.getvalue()
    if kind == "truncated":
        data = jpeg_bytes(width, height, seed)
        return data[: len(data) // 2]
    if kind == "truncated_png":
        data = _png(rgb)
        return data[: len(data) // 2]
    if kind == "svg":
        return (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                b'<rect width="10" height="10" fill="red"/></svg>')
    if kind == "html":
        return b"<!DOCTYPE html><html><body><h1>Not Found</h1></body></html>"
    if kind == "empty":
        return b""
    if kind == "bomb":
        return bomb_png()
    raise ValueError(f"unknown image kind {kind!r}")


CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
                 "svg": "image/svg+xml", "html": "text/html", "bmp": "image/bmp", "tiff": "image/tiff"}


# --------------------------------------------------------------------------- server
@dataclass
class Route:
    status: int = 200
    body: bytes | Callable[[], bytes] = b""
    content_type: str | None = "image/jpeg"
    headers: dict[str, str] = field(default_factory=dict)
    fail_times: int = 0            # answer fail_status this many times first
    fail_status: int = 503
    retry_after: str | None = None  # sent with the failures
    drip: tuple[int, float] | None = None  # (bytes per write, seconds between writes)
    delay_s: float = 0.0           # before the status line
    redirect: str | None = None    # Location (status 302 unless status says 301/303/307/308)
    content_length: int | None = -1  # -1: the true length; None: omit (body ends at close); N: a lie
    huge: int = 0                  # stream this many bytes of garbage instead of body
    trailing: bytes = b""          # sent after the body (past its true Content-Length), connection kept open
    trailing_delay_s: float = 0.0  # wait between the body and `trailing`
    hits: int = 0


@dataclass
class RequestRecord:
    path: str
    headers: dict[str, str]
    at: float
    client: str


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive like real image hosts; an idle kept-alive connection is closed after
    # `idle_timeout_s` (as servers do), which the client's stale-connection handling must survive.
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as nginx and CDNs set on kept-alive connections: otherwise the body's last
    # small segment waits for the client's delayed ACK (~40 ms) behind the header segment.
    disable_nagle_algorithm = True
    server: "_Server"

    def setup(self) -> None:
        self.timeout = self.server.owner.idle_timeout_s  # StreamRequestHandler.setup applies it
        super().setup()
        with self.server.owner._lock:
            self.server.owner.connections += 1

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        return

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        owner._record(RequestRecord(self.path, dict(self.headers.items()), time.monotonic(), self.client_address[0]))
        route = owner._lookup(self.path)
        with owner._lock:
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
        try:
            self._serve(route)
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            pass
        finally:
            with owner._lock:
                owner.in_flight -= 1

    def _serve(self, route: Route | None) -> None:
        if route is None:
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "13")
            self.end_headers()
            self.wfile.write(b"no such route")
            return
        with self.server.owner._lock:
            route.hits += 1
            hit = route.hits
        if route.delay_s:
            time.sleep(route.delay_s)
        if hit <= route.fail_times:
            self.send_response(route.fail_status)
            if route.retry_after is not None:
                self.send_header("Retry-After", route.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.redirect is not None:
            self.send_response(route.status if route.status in (301, 302, 303, 307, 308) else 302)
            self.send_header("Location", route.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = route.body() if callable(route.body) else route.body
        self.send_response(route.status)
        if route.content_type:
            self.send_header("Content-Type", route.content_type)
        for name, value in route.headers.items():
            for item in (value if isinstance(value, list) else [value]):
                self.send_header(name, item)
        size = route.huge or len(body)
        if route.content_length == -1:
            self.send_header("Content-Length", str(size))
        elif route.content_length is not None:
            self.send_header("Content-Length", str(route.content_length))
        if route.content_length != -1 or route.huge:
            self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        if route.huge:
            block = b"\xab" * 65536
            sent = 0
            while sent < route.huge:
                n = min(len(block), route.huge - sent)
                self.wfile.write(block[:n])
                sent += n
            return
        if route.drip is not None:
            step, pause = route.drip
            for i in range(0, len(body), step):
                self.wfile.write(body[i:i + step])
                self.wfile.flush()
                time.sleep(pause)
            return
        self.wfile.write(body)
        if route.trailing:
            time.sleep(route.trailing_delay_s)
            self.wfile.write(route.trailing)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True
    owner: "LoopbackServer"


class LoopbackServer:
    """See the module docstring. `host` may be any 127.x address (127.0.0.2 for a 'second host')."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, idle_timeout_s: float = 5.0) -> None:
        self.host = host
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._pool: list[bytes] = []
        self.requests: list[RequestRecord] = []
        self.in_flight = 0
        self.connections = 0  # TCP connections accepted (keep-alive tests)
        self.max_in_flight = 0  # most requests being answered at once (per-host cap tests)
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"loopback-{host}:{self.port}", daemon=True)

    def start(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + (path if path.startswith("/") else "/" + path)

    def route(self, path: str, body: bytes | str | Callable[[], bytes] = b"", kind: str | None = None,
              **behaviour: Any) -> str:
        """Register `path` (exact, query included) and return its full URL."""
        if kind is not None:
            body = make_image(kind)
            behaviour.setdefault("content_type", CONTENT_TYPES.get(kind, "image/jpeg"))
        if isinstance(body, str):
            body = body.encode()
        with self._lock:
            self._routes[path] = Route(body=body, **behaviour)
        return self.url(path)

    def image(self, path: str, kind: str = "jpeg", **behaviour: Any) -> str:
        return self.route(path, kind=kind, **behaviour)

    def set_pool(self, images: list[bytes]) -> None:
        """Bodies served at /pool/<i>.jpg (index modulo the pool size): many URLs, little memory."""
        with self._lock:
            self._pool = list(images)

    def pool_url(self, index: int) -> str:
        return self.url(f"/pool/{index}.jpg")

    def _lookup(self, path: str) -> Route | None:
        with self._lock:
            route = self._routes.get(path)
            if route is None and path.startswith("/pool/") and self._pool:
                try:
                    index = int(path[6:].split(".", 1)[0])
                except ValueError:
                    return None
                return Route(body=self._pool[index % len(self._pool)])
            return route

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path == path)

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()


def realistic_jpeg_pool(count: int = 32, seed: int = 0) -> list[bytes]:
    """JPEGs of photo-like content between ~20 and ~100 KB (sizes 320x240 .. 800x600)."""
    sizes = [(320, 240), (400, 300), (480, 360), (512, 384), (640, 480), (500, 500), (384, 512), (600, 400)]
    pool = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        pool.append(jpeg_bytes(w, h, seed=seed + i, quality=[75, 80, 85, 90][(i // 8) % 4], noise=6 + (i % 5) * 2))
    return pool
