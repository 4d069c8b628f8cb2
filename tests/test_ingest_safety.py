"""SSRF rules: schemes, addresses in every spelling, redirects re-checked, hop limit."""

from __future__ import annotations

import ipaddress

import pytest

from latentforge.ingest.download import Fetcher, FetchSettings
from latentforge.ingest.safety import AddressPolicy, BlockedURL, parse_ip_literal

REFUSED = [
    "file:///etc/passwd",
    "ftp://example.com/a.jpg",
    "data:image/png;base64,iVBORw0KGgo=",
    "gopher://127.0.0.1:70/",
    "http://169.254.169.254/latest/meta-data/",
    "http://0xA9FEA9FE/latest/meta-data/",
    "http://2852039166/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://0251.0376.0251.0376/",
    "http://169.254.169.254.:80/",
    "http://10.0.0.1/a.jpg",
    "http://192.168.1.1/a.jpg",
    "http://172.16.0.1/a.jpg",
    "http://100.64.0.1/a.jpg",
    "http://224.0.0.1/a.jpg",
    "http://0.0.0.0/a.jpg",
    "http://[::1]/a.jpg",
    "http://[fe80::1]/a.jpg",
    "http://[64:ff9b::a9fe:a9fe]/a.jpg",
    "http://[2002:a9fe:a9fe::1]/a.jpg",
    "http://user:pw@93.184.216.34/a.jpg",
]


def _fetcher(**policy) -> Fetcher:
    return Fetcher(FetchSettings(timeout_s=3, retries=0), AddressPolicy(**policy))


@pytest.mark.parametrize("url", REFUSED)
def test_refused_without_network(url: str) -> None:
    result = _fetcher().fetch(url)
    assert result.status == "ssrf_blocked", (url, result)


def test_loopback_spellings_never_reach_the_server(http_server) -> None:
    http_server.image("/a.jpg")
    port = http_server.port
    urls = [f"http://127.1:{port}/a.jpg", f"http://127.0.0.1:{port}/a.jpg", f"http://2130706433:{port}/a.jpg",
            f"http://0x7f000001:{port}/a.jpg", f"http://0177.0.0.1:{port}/a.jpg", f"http://localhost:{port}/a.jpg",
            f"http://[::ffff:127.0.0.1]:{port}/a.jpg", f"http://[::ffff:7f00:1]:{port}/a.jpg",
            f"http://127.000.000.001:{port}/a.jpg", "http://169.254.169.254/", "http://0xA9FEA9FE/",
            "http://2852039166/", "http://[::ffff:169.254.169.254]/", "file:///etc/passwd", "ftp://127.0.0.1/",
            "data:text/plain,hi"]
    fetcher = _fetcher()
    for url in urls:
        assert fetcher.fetch(url).status == "ssrf_blocked", url
    assert http_server.requests == [], "a refused URL reached the server"


def test_allow_private_network_lifts_the_address_rule(http_server) -> None:
    url = http_server.image("/a.jpg")
    assert _fetcher(allow_private=True).fetch(url).status == "ok"
    # ... but never the scheme rule
    assert _fetcher(allow_private=True).fetch("file:///etc/passwd").status == "ssrf_blocked"


def test_allow_networks_is_narrow(http_server, second_server) -> None:
    url = http_server.image("/a.jpg")
    other = second_server.image("/b.jpg")
    fetcher = _fetcher(allow_networks=["127.0.0.1/32"])
    assert fetcher.fetch(url).status == "ok"
    assert fetcher.fetch(other).status == "ssrf_blocked"
    assert second_server.requests == []


def test_redirect_to_private_address_is_refused(http_server, second_server) -> None:
    # The first hop is allowed (127.0.0.1/32 is listed); every later hop is checked again.
    second_server.image("/secret.jpg")
    hops = {
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/to-hex": "http://0xA9FEA9FE/",
        "/to-other-loopback": second_server.url("/secret.jpg"),
        "/to-file": "file:///etc/passwd",
        "/to-mapped": "http://[::ffff:169.254.169.254]/",
    }
    fetcher = _fetcher(allow_networks=["127.0.0.1/32"])
    for path, location in hops.items():
        http_server.route(path, redirect=location)
        result = fetcher.fetch(http_server.url(path))
        assert result.status == "ssrf_blocked", (path, result)
    assert second_server.requests == []


def test_redirect_to_another_host_allowed_when_private_allowed(http_server, second_server) -> None:
    target = second_server.image("/b.jpg")
    http_server.route("/hop", redirect=target, status=301)
    result = _fetcher(allow_private=True).fetch(http_server.url("/hop"))
    assert result.status == "ok" and result.final_url == target
    assert second_server.hits("/b.jpg") == 1


def test_redirect_hop_limit(http_server) -> None:
    for i in range(10):
        http_server.route(f"/r{i}", redirect=f"/r{i + 1}")
    http_server.image("/r10")
    fetcher = Fetcher(FetchSettings(timeout_s=3, retries=0, max_redirects=3), AddressPolicy(allow_private=True))
    assert fetcher.fetch(http_server.url("/r0")).status == "too_many_redirects"
    assert fetcher.fetch(http_server.url("/r7")).status == "ok"  # 3 hops: /r8 /r9 /r10


def test_dns_names_resolving_to_private_addresses_are_refused() -> None:
    policy = AddressPolicy(resolver=lambda host, port: ["93.184.216.34", "10.1.2.3"])
    fetcher = Fetcher(FetchSettings(timeout_s=2, retries=0), policy)
    result = fetcher.fetch("http://rebind.example/a.jpg")
    assert result.status == "ssrf_blocked" and "10.1.2.3" in result.error


def test_dns_failure_is_dns() -> None:
    result = _fetcher().fetch("http://no-such-host.invalid/a.jpg")
    assert result.status == "dns"


def test_ip_literal_spellings() -> None:
    assert parse_ip_literal("127.1") == ipaddress.ip_address("127.0.0.1")
    assert parse_ip_literal("0xA9FEA9FE") == ipaddress.ip_address("169.254.169.254")
    assert parse_ip_literal("2852039166") == ipaddress.ip_address("169.254.169.254")
    assert parse_ip_literal("[::ffff:169.254.169.254]") == ipaddress.ip_address("::ffff:169.254.169.254")
    assert parse_ip_literal("example.com") is None
    assert parse_ip_literal("1e100.net") is None
    with pytest.raises(BlockedURL):
        AddressPolicy().check_url("http://[::ffff:a9fe:a9fe]/")
    AddressPolicy().check_url("http://93.184.216.34/a.jpg")  # public literal passes
