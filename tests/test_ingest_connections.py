"""HTTP keep-alive: a host's connections are reused, and only when that is safe."""

from __future__ import annotations

import time

from latentforge.ingest.download import Fetcher, FetchSettings
from latentforge.ingest.safety import AddressPolicy
import pytest

from tests.harness.http_server import LoopbackServer, jpeg_bytes


def fetcher(**settings) -> Fetcher:
    return Fetcher(FetchSettings(timeout_s=3.0, retries=0, **settings), AddressPolicy(allow_private=True))


def pool_server(**kwargs) -> LoopbackServer:
    server = LoopbackServer(**kwargs)  # started by `with`
    server.set_pool([jpeg_bytes(64, 48, seed=i) for i in range(4)])
    return server


def test_sequential_images_from_one_host_share_one_connection() -> None:
    with pool_server() as server:
        f = fetcher()
        results = [f.fetch(server.pool_url(i)) for i in range(20)]
        assert [r.status for r in results] == ["ok"] * 20
        assert [r.data for r in results[:4]] == server._pool
        assert server.connections == 1
        assert f.connections.opened == 1 and f.connections.reused == 19
        assert "Connection" not in server.requests[0].headers


def test_reuse_off_opens_a_connection_per_image_and_says_close() -> None:
    with pool_server() as server:
        f = fetcher(reuse_connections=False)
        assert all(f.fetch(server.pool_url(i)).status == "ok" for i in range(5))
        assert server.connections == 5
        assert {r.headers.get("Connection") for r in server.requests} == {"close"}


def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_failed_attempt() -> None:
    with pool_server(idle_timeout_s=0.2) as server:
        f = fetcher()
        assert f.fetch(server.pool_url(0)).status == "ok"
        time.sleep(0.6)  # the server drops the idle connection
        result = f.fetch(server.pool_url(1))
        assert result.status == "ok" and result.attempts == 1 and result.data == server._pool[1]
        assert server.connections == 2 and f.connections.opened == 2


def test_a_connection_with_an_unread_body_is_never_reused() -> None:
    # A 404's body is not read; reusing its connection would parse that body as the next
    # response's status line.
    with pool_server() as server:
        f = fetcher()
        assert f.fetch(server.url("/missing")).status == "http_4xx"
        assert f.fetch(server.pool_url(0)).status == "ok"
        assert f.fetch(server.pool_url(1)).status == "ok"
        assert server.connections == 2 and f.connections.reused == 1


def test_connections_are_kept_per_host() -> None:
    with pool_server() as first, pool_server(host="127.0.0.2") as second:
        f = fetcher()
        for i in range(3):
            assert f.fetch(first.pool_url(i)).status == "ok"
            assert f.fetch(second.pool_url(i)).status == "ok"
        assert (first.connections, second.connections) == (1, 1)
        assert [len(s.requests) for s in (first, second)] == [3, 3]


@pytest.mark.parametrize("delay_s", [0.0, 0.2])
def test_bytes_past_the_content_length_never_answer_the_next_request(delay_s: float) -> None:
    # The server appends a whole forged response to /a.jpg's body, at once or after a pause (then it
    # arrives while the connection sits idle). Reusing that connection would make it /b.jpg's answer.
    forged = jpeg_bytes(40, 30, seed=9)
    trailing = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(forged) + forged
    with pool_server() as server:
        a = server.route("/a.jpg", body=jpeg_bytes(64, 48, seed=1), trailing=trailing, trailing_delay_s=delay_s)
        b = server.route("/b.jpg", body=jpeg_bytes(64, 48, seed=2))
        f = fetcher()
        assert f.fetch(a).data == jpeg_bytes(64, 48, seed=1)
        time.sleep(0.4)
        result = f.fetch(b)
        assert result.status == "ok" and result.data == jpeg_bytes(64, 48, seed=2)
        assert server.connections == 2 and f.connections.reused == 0
