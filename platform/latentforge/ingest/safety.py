"""Which URLs may be fetched: http/https only, and only hosts on public addresses.

Server-side request forgery is the classic way a crawler gets turned against the network it
runs in (cloud metadata at 169.254.169.254, admin ports on 127.0.0.1). The rules here:

- only `http` and `https`; no user-info in the URL;
- an IP literal is parsed the way the C library would (`127.1`, `0x7f.1`, `2130706433`,
  `0177.0.0.1`, `[::ffff:127.0.0.1]`, 6to4/NAT64/Teredo wrappers) and its *embedded* IPv4
  address is what gets checked;
- a host name is resolved once, every address it resolves to must be public, and the
  connection is then made to those checked addresses, in turn until one takes it (so DNS
  rebinding between check and connect cannot happen);
- every redirect hop goes through the same check (done by `download.Fetcher`).

`allow_private=True` lifts the address rule (tests and the demo serve from 127.0.0.1);
`allow_networks` lifts it for listed CIDRs only.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


@functools.cache
def _resolver_pool() -> ThreadPoolExecutor:
    """getaddrinfo has no timeout of its own; it runs here so a request's deadline still holds.

    Made on first use, not at import: importing the library starts no threads."""
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix="lf-dns")


class BlockedURL(Exception):
    """The URL is refused by the safety rules (status `ssrf_blocked` or `bad_url`)."""

    def __init__(self, message: str, reason: str = "ssrf_blocked") -> None:
        super().__init__(message)
        self.reason = reason


class ResolveError(Exception):
    """The host name did not resolve (status `dns`), or not before the deadline (`timeout`)."""

    def __init__(self, message: str, reason: str = "dns") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect and what to ask for."""

    url: str
    scheme: str
    host: str          # as written (IDNA-encoded), used for Host and TLS SNI
    port: int
    path: str          # path + query, what goes on the request line
    literal: IPAddress | None  # the host's address when the URL names an IP literal


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address an IP-literal host means, in any spelling the C library accepts; else None."""
    host = host.strip("[]").rstrip(".")
    if not host:
        return None
    if "%" in host:  # IPv6 zone id: fe80::1%eth0
        host = host.split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # inet_aton is what getaddrinfo uses for IPv4 literals: "127.1", "0x7f000001", "2130706433",
    # "0177.0.0.1" all mean 127.0.0.1. Only digits/hex/dots can be such a literal.
    if all(c in "0123456789abcdefxABCDEFX." for c in host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo client, NAT64)."""
    if ip.version != 6:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_problem(ip: IPAddress) -> str | None:
    """Why an address is not public (None when it is), checking embedded IPv4 addresses too."""
    inner = embedded_ipv4(ip)
    for addr in ([inner] if inner is not None else []) + [ip]:
        for attr, what in (("is_loopback", "loopback"), ("is_link_local", "link-local"),
                           ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
                           ("is_private", "private"), ("is_reserved", "reserved")):
            if getattr(addr, attr):
                via = f" (embedded in {ip})" if addr is not ip else ""
                return f"{addr} is a {what} address{via}"
        if not addr.is_global:
            return f"{addr} is not a public address"
    return None


@dataclass
class AddressPolicy:
    """The URL and address rules; `check_url` + `resolve` is what every hop goes through."""

    allow_private: bool = False
    allow_networks: list[str] = field(default_factory=list)
    resolver: Callable[[str, int], list[str]] | None = None

    def __post_init__(self) -> None:
        self._networks = [ipaddress.ip_network(c, strict=False) for c in self.allow_networks]

    def check_url(self, url: str) -> Target:
        """Scheme, host and port checks that need no network; raises BlockedURL."""
        if not isinstance(url, str) or not url.strip():
            raise BlockedURL("empty URL", reason="bad_url")
        url = url.strip()
        try:
            parts: SplitResult = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise BlockedURL(f"unparsable URL: {exc}", reason="bad_url") from exc
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise BlockedURL(f"scheme {scheme or '(none)'!r} is not allowed; only http and https")
        if parts.username is not None or parts.password is not None:
            raise BlockedURL("URLs with user-info (user:pass@host) are not fetched")
        host = parts.hostname or ""
        if not host:
            raise BlockedURL("URL has no host", reason="bad_url")
        try:
            host_ascii = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError as exc:
            raise BlockedURL(f"bad host name {host!r}", reason="bad_url") from exc
        literal = parse_ip_literal(host_ascii)
        if literal is not None:
            self.check_address(literal, host_ascii)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Target(url=url, scheme=scheme, host=host_ascii, port=port or DEFAULT_PORTS[scheme],
                      path=path, literal=literal)

    def check_address(self, ip: IPAddress, host: str = "") -> None:
        if self.allow_private:
            return
        problem = address_problem(ip)
        if problem is None:
            return
        if any(ip in net for net in self._networks if net.version == ip.version):
            return
        shown = f"{host} -> {problem}" if host and host != str(ip) else problem
        raise BlockedURL(f"refused: {shown} (use --allow-private-network to allow)")

    def resolve(self, target: Target, timeout_s: float) -> list[IPAddress]:
        """Checked addresses to connect to; every address the name resolves to must pass."""
        if target.literal is not None:
            return [target.literal]
        if target.host.lower().rstrip(".") in ("localhost", "localhost.localdomain") or \
                target.host.lower().endswith(".localhost"):
            if not self.allow_private:
                raise BlockedURL(f"refused: {target.host} is a loopback name")
        lookup = self.resolver or _getaddrinfo
        future = _resolver_pool().submit(lookup, target.host, target.port)
        try:
            names = future.result(timeout=max(timeout_s, 0.001))
        except FutureTimeout as exc:
            raise ResolveError(f"resolving {target.host} took longer than the deadline", "timeout") from exc
        except (socket.gaierror, UnicodeError) as exc:
            raise ResolveError(f"cannot resolve {target.host}: {exc}") from exc
        addresses: list[IPAddress] = []
        for name in names:
            ip = ipaddress.ip_address(name.split("%", 1)[0])
            self.check_address(ip, target.host)
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise ResolveError(f"{target.host} has no addresses")
        return addresses


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]
