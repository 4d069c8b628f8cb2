"""A loopback static HTTP server for the demo images, with a few deliberately broken URLs.

It binds 127.0.0.1 only (an ephemeral port by default): the demo's ingest runs with
`--allow-private-network` because of it, and nothing is ever exposed beyond this machine.
"""

from __future__ import annotations

import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import unquote, urlsplit

from latentforge.demo.scenes import Scene

BROKEN_KINDS: tuple[str, ...] = ("missing", "html", "truncated")
"""What a broken URL does: 404, an HTML page with 200, a PNG cut in half."""


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet by design
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        parts = [p for p in unquote(urlsplit(self.path).path).split("/") if p]
        self.server.requests += 1
        if len(parts) == 2 and parts[0] == "images":
            data = self._read(parts[1])
            if data is not None:
                return self._send(HTTPStatus.OK, data, "image/png")
        elif len(parts) == 3 and parts[0] == "broken":
            kind, name = parts[1], parts[2]
            if kind == "html":
                return self._send(HTTPStatus.OK, b"<html><body>not an image</body></html>", "text/html")
            if kind == "truncated":
                data = self._read(name)
                if data is not None:
                    return self._send(HTTPStatus.OK, data[: len(data) // 2], "image/png")
        self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

    def _read(self, name: str) -> bytes | None:
        if "/" in name or name.startswith("."):
            return None
        path = self.server.root / "images" / name
        return path.read_bytes() if path.is_file() else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    requests: int = 0


class DemoImageServer:
    """Serves `ROOT/images/*` at `http://127.0.0.1:PORT/images/NAME` on a background thread.

    Use as a context manager; `url_for(scene)` gives a row's URL, `broken_url(kind, scene)` a
    URL that fails in the named way.
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root)
        self.host, self.port = host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "DemoImageServer":
        server = _Server((self.host, self.port), _Handler)
        server.root = self.root
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="demo-image-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "DemoImageServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> int:
        return self._server.requests if self._server else 0

    def url_for(self, scene: Scene) -> str:
        return f"{self.base_url}/{scene.path}"

    def broken_url(self, kind: str, scene: Scene) -> str:
        if kind not in BROKEN_KINDS:
            raise ValueError(f"unknown broken kind {kind!r}; known: {BROKEN_KINDS}")
        return f"{self.base_url}/broken/{kind}/{Path(scene.path).name}"


def url_rows(server: DemoImageServer, scenes: Sequence[Scene], broken_every: int = 250) -> list[dict[str, str]]:
    """One row per scene (url, caption, colour, shape, position); every `broken_every`-th row
    (from row 7 on) gets a broken URL, cycling through BROKEN_KINDS."""
    rows = []
    for i, scene in enumerate(scenes):
        if broken_every and i % broken_every == 7:
            url = server.broken_url(BROKEN_KINDS[(i // broken_every) % len(BROKEN_KINDS)], scene)
        else:
            url = server.url_for(scene)
        rows.append({"url": url, "caption": scene.caption, "colour": scene.colour, "shape": scene.shape,
                     "position": scene.position})
    return rows


def write_url_list(rows: Iterable[dict[str, str]], path: str | Path) -> Path:
    """Write the rows as parquet (the ingest job's input); returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    table = pa.Table.from_pylist(rows) if rows else pa.table({"url": [], "caption": []})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m latentforge.demo SCENES_DIR URLS_OUT [--port P]`: serve built scenes until Ctrl-C.

    Writes a URL list pointing at this server (for trying the ingest job by hand, see README).
    """
    import argparse
    import time

    from latentforge.demo.scenes import load_scenes

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("scenes", help="a directory written by the demo (demo_output/scenes)")
    parser.add_argument("urls_out", help="where to write the URL list (.parquet)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--broken-every", type=int, default=250)
    args = parser.parse_args(argv)
    with DemoImageServer(args.scenes, port=args.port) as server:
        write_url_list(url_rows(server, load_scenes(args.scenes), args.broken_every), args.urls_out)
        print(f"serving {args.scenes} at {server.base_url}; URL list: {args.urls_out} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
