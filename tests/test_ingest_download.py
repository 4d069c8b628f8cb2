"""Downloading against the loopback server: statuses, retries, deadline, size caps, opt-outs."""

from __future__ import annotations

import email.utils
import time
from concurrent.futures import ThreadPoolExecutor
import tracemalloc

import pytest

from latentforge.ingest.download import Fetcher, FetchResult, FetchSettings, is_opted_out, parse_retry_after
from latentforge.ingest.safety import AddressPolicy


def fetch_concurrently(f: Fetcher, urls: list[str]) -> list[FetchResult]:
    """Every URL fetched on a thread of its own, all at once."""
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        return list(pool.map(f.fetch, urls))


def fetcher(**settings) -> Fetcher:
    base = dict(timeout_s=3.0, retries=2, backoff_s=0.01, backoff_max_s=0.05)
    base.update(settings)
    return Fetcher(FetchSettings(**base), AddressPolicy(allow_private=True))


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_4xx_is_not_retried(http_server, status: int) -> None:
    url = http_server.route("/x", status=status, content_type="text/plain")
    result = fetcher(retries=3).fetch(url)
    assert result.status == "http_4xx" and result.http_status == status
    assert http_server.hits("/x") == 1


def test_5xx_is_retried_then_reported(http_server) -> None:
    url = http_server.route("/x", status=500, content_type="text/plain")
    result = fetcher(retries=2).fetch(url)
    assert result.status == "http_5xx" and result.attempts == 3 and http_server.hits("/x") == 3


def test_429_with_retry_after_is_retried_after_waiting(http_server) -> None:
    url = http_server.image("/x", fail_times=2, fail_status=429, retry_after="1")
    started = time.monotonic()
    result = fetcher(retries=3, timeout_s=6.0).fetch(url)
    elapsed = time.monotonic() - started
    assert result.status == "ok" and result.attempts == 3
    assert elapsed >= 2.0, "Retry-After: 1 was not honoured"
    gaps = [b.at - a.at for a, b in zip(http_server.requests, http_server.requests[1:])]
    assert all(g >= 0.95 for g in gaps), gaps


def test_503_retry_after_http_date(http_server) -> None:
    when = email.utils.formatdate(time.time() + 1, usegmt=True)
    url = http_server.image("/x", fail_times=1, fail_status=503, retry_after=when)
    result = fetcher(retries=1).fetch(url)
    assert result.status == "ok" and http_server.hits("/x") == 2


def test_retry_after_longer_than_allowed_is_not_waited_for(http_server) -> None:
    url = http_server.image("/x", fail_times=5, fail_status=429, retry_after="3600")
    started = time.monotonic()
    result = fetcher(retries=3, max_retry_after_s=10).fetch(url)
    assert result.status == "http_4xx" and result.http_status == 429
    assert time.monotonic() - started < 2 and http_server.hits("/x") == 1


def test_backoff_is_exponential_with_jitter() -> None:
    f = Fetcher(FetchSettings(backoff_s=1.0, backoff_max_s=100), AddressPolicy())
    for attempt in range(4):
        delays = [f.backoff(attempt, None) for _ in range(50)]
        assert 0.5 * 2 ** attempt <= min(delays) and max(delays) <= 1.5 * 2 ** attempt
        assert len(set(delays)) > 1  # jittered
    assert f.backoff(0, 7.0) >= 7.0
    assert parse_retry_after("12") == 12.0 and parse_retry_after("nonsense") is None


def test_slow_drip_body_is_cut_at_the_total_deadline(http_server) -> None:
    # 1 byte every 50 ms: every single read is fast, only a total deadline can stop it.
    url = http_server.image("/drip", drip=(1, 0.05))
    started = time.monotonic()
    result = fetcher(timeout_s=1.0, retries=0).fetch(url)
    elapsed = time.monotonic() - started
    assert result.status == "timeout"
    assert elapsed < 1.8, f"deadline of 1 s took {elapsed:.2f} s"


def test_slow_headers_are_cut_at_the_deadline(http_server) -> None:
    url = http_server.image("/slow", delay_s=3)
    started = time.monotonic()
    assert fetcher(timeout_s=0.5, retries=0).fetch(url).status == "timeout"
    assert time.monotonic() - started < 1.5


def test_a_timeout_ends_the_request(http_server) -> None:
    url = http_server.image("/slow", delay_s=2)
    result = fetcher(timeout_s=0.3, retries=1).fetch(url)
    assert result.status == "timeout" and result.attempts == 1


def test_the_deadline_covers_retries_and_backoff(http_server) -> None:
    # 8 retries with >= 0.3 s backoff each would take >= 2.4 s; the request has 1.5 s in all.
    url = http_server.route("/down", status=500, content_type="text/plain")
    started = time.monotonic()
    result = fetcher(timeout_s=1.5, retries=8, backoff_s=0.6, backoff_max_s=0.6).fetch(url)
    elapsed = time.monotonic() - started
    assert result.status == "http_5xx" and 2 <= result.attempts < 9
    assert elapsed < 1.7, f"a 1.5 s deadline took {elapsed:.2f} s"


def test_the_deadline_covers_a_slow_redirect_chain_and_its_retries(http_server) -> None:
    # Each hop answers after 0.3 s: the third cannot finish within 0.8 s, and a retry starts no new clock.
    for i in range(3):
        http_server.route(f"/r{i}", redirect=f"/r{i + 1}", delay_s=0.3)
    http_server.image("/r3")
    started = time.monotonic()
    result = fetcher(timeout_s=0.8, retries=3).fetch(http_server.url("/r0"))
    elapsed = time.monotonic() - started
    assert result.status == "timeout" and result.attempts == 1
    assert elapsed < 1.2, f"a 0.8 s deadline took {elapsed:.2f} s"


def test_declared_oversize_is_refused_before_reading(http_server) -> None:
    url = http_server.route("/big", huge=200 << 20)
    started = time.monotonic()
    result = fetcher(max_bytes=1 << 20, retries=0).fetch(url)
    assert result.status == "too_large" and "Content-Length" in result.error
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("declared", [None, 1000])
def test_huge_body_without_or_with_lying_length_is_cut_with_bounded_memory(http_server, declared) -> None:
    # No Content-Length (body ends at close), or one that claims 1000 bytes: either way the
    # download stops at max_bytes and memory stays near max_bytes, not 200 MB.
    url = http_server.route("/huge", huge=200 << 20, content_length=declared)
    tracemalloc.start()
    try:
        result = fetcher(max_bytes=2 << 20, retries=0).fetch(url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if declared is None:
        assert result.status == "too_large"
    else:  # a 1000-byte "image" of garbage: read exactly what was declared, never more
        assert result.status == "ok" and len(result.data) == 1000
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_body_shorter_than_content_length_is_an_error(http_server) -> None:
    url = http_server.image("/short", content_length=10 ** 6)
    assert fetcher(retries=0).fetch(url).status == "connection"


def test_user_agent_token_is_sent(http_server) -> None:
    url = http_server.image("/a.jpg")
    fetcher(user_agent_token="forgebot").fetch(url)
    assert "forgebot" in http_server.requests[0].headers["User-Agent"]


@pytest.mark.parametrize("header,refused", [
    ("noai", True), ("noimageai", True), ("noindex, NoAI", True), ("forgebot: noai", True),
    ("otherbot: noai", False), ("noindex", False), ("none", False),
])
def test_x_robots_tag(http_server, header: str, refused: bool) -> None:
    url = http_server.image("/a.jpg", headers={"X-Robots-Tag": header})
    result = fetcher(user_agent_token="forgebot").fetch(url)
    assert result.status == ("opt_out" if refused else "ok")
    assert fetcher(user_agent_token="forgebot", honor_opt_out=False).fetch(url).status == "ok"


def test_opt_out_parser_reads_every_header_value() -> None:
    assert is_opted_out(["otherbot: noindex", "noimageai"], "lf", ["noai", "noimageai"])
    assert not is_opted_out(["otherbot: noimageai"], "lf", ["noai", "noimageai"])


def test_per_host_concurrency_cap(http_server) -> None:
    url = http_server.image("/slow.jpg", delay_s=0.3)
    f = fetcher(max_per_host=2)
    results = fetch_concurrently(f, [url] * 6)
    assert all(r.status == "ok" for r in results)
    assert http_server.max_in_flight == 2


def test_per_host_cap_holds_for_redirect_targets(http_server, second_server) -> None:
    # Four requests straight to the second host and four redirected to it by the first one.
    direct = second_server.image("/slow.jpg", delay_s=0.3)
    via = http_server.route("/hop", redirect=direct)
    f = fetcher(max_per_host=2)
    results = fetch_concurrently(f, [direct, via] * 4)
    assert [r.status for r in results] == ["ok"] * 8
    assert second_server.max_in_flight == 2


def test_every_resolved_address_is_tried(http_server) -> None:
    # images.test resolves to 127.0.0.3 (nothing listens: refused) and then to the server's address.
    url = http_server.image("/a.jpg").replace("127.0.0.1", "images.test")
    names = ["127.0.0.3", "127.0.0.1"]
    f = Fetcher(FetchSettings(timeout_s=3, retries=0), AddressPolicy(allow_networks=["127.0.0.0/8"],
                                                                     resolver=lambda host, port: names))
    result = f.fetch(url)
    assert result.status == "ok" and result.attempts == 1 and http_server.hits("/a.jpg") == 1
    assert http_server.requests[0].headers["Host"].startswith("images.test")
    names[:] = ["127.0.0.3", "169.254.169.254", "127.0.0.1"]  # one refused address refuses the name
    assert f.fetch(url).status == "ssrf_blocked" and http_server.hits("/a.jpg") == 1


def test_wrong_content_type_does_not_matter(http_server) -> None:
    # Content-Type is advisory: the bytes decide (images/test_ingest_images covers the decoding).
    url = http_server.image("/a.bin", content_type="application/octet-stream")
    assert fetcher().fetch(url).status == "ok"


def test_connection_refused_is_connection() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = fetcher(retries=1).fetch(f"http://127.0.0.1:{port}/a.jpg")
    assert result.status == "connection" and result.attempts == 2
