"""The outbound SSRF guard: which URLs the proxy may fetch on a client's behalf."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httpx

from ._errors import BlockedURL, MediaError
from ._hosts import format_host_port, host_matches

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses`` (textual IPs). The default uses ``loop.getaddrinfo``."""

_SCHEMES = {"http": 80, "https": 443}
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, ...
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, NAT64, 6to4), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


_IPV4_PART = re.compile(r"^(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$")


def _ipv4_part(text: str) -> int:
    if text[:2].lower() == "0x":
        return int(text[2:], 16)
    if text.startswith("0"):
        return int(text, 8)
    return int(text)


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address ``inet_aton`` (and so ``getaddrinfo``) reads in ``host``, if any.

    Besides dotted quads it accepts one to four parts, each decimal, octal
    (leading ``0``) or hex (``0x``), the last part filling the remaining bytes:
    ``127.1``, ``0x7f.1``, ``0177.0.0.1`` and ``2130706433`` are all 127.0.0.1.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.match(p) for p in parts):
        return None
    *head, last = [_ipv4_part(p) for p in parts]
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for i, value in enumerate(head):
        number |= value << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def parse_ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is one, in any form a resolver reads
    without asking DNS (``127.1``, ``0x7f.1``, ``2130706433``, ``::ffff:127.0.0.1``,
    ``fe80::1%eth0``, and with a trailing dot: ``127.0.0.1.``); ``None`` for a
    hostname. Over-reading is safe here: the result is only ever refused or pinned."""
    text = host[:-1] if host.endswith(".") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return _legacy_ipv4(text)


def address_refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted (a client-safe phrase), or ``None`` if public."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        inner = _embedded_ipv4(ip)
        if inner is not None:
            why = address_refusal(inner)
            if why is not None:
                return f"an IPv6 address embedding {why}"
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:  # fec0::/10, deprecated
        return "a site-local address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a carrier-grade NAT address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-public address"
    return None


async def _system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Target:
    """A URL that passed the guard, with the addresses it was checked against."""

    url: httpx.URL
    host: str  # ASCII (IDNA) host, IPv6 without brackets
    port: int
    addresses: tuple[str, ...]  # checked IPs, resolver order, deduplicated
    host_is_ip: bool


def parse_http_url(url: str | httpx.URL) -> httpx.URL:
    """Parse with httpx (the same parser that will connect) and check the shape."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise BlockedURL("malformed URL") from exc
    if parsed.scheme not in _SCHEMES:
        raise BlockedURL(f"only http and https URLs are allowed, not {parsed.scheme or 'none'!r}")
    if parsed.userinfo:
        raise BlockedURL("URLs with credentials (user:password@) are not allowed")
    if not parsed.raw_host:
        raise BlockedURL("URL has no host")
    return parsed


def effective_port(url: httpx.URL) -> int:
    return url.port if url.port is not None else _SCHEMES[url.scheme]


@dataclass
class OutboundGuard:
    """Refuses URLs that point into our own network (SSRF) or off the host lists.

    Every address a hostname resolves to must be public: one private answer
    among public ones is enough to refuse (multi-answer rebinding trick).
    ``allow_private`` lifts the address rules (and the metadata names) for
    tests and on-prem deployments; scheme, credential and host-list rules
    always apply. ``check_url`` alone is only advisory for later connections,
    which resolve again (DNS rebinding); ``download`` closes that gap by
    connecting to the addresses returned by :meth:`resolve`.
    """

    allow_private: bool = False  # permit private/loopback/link-local addresses (tests, on-prem)
    allowed_hosts: tuple[str, ...] = ()  # if non-empty, only these host patterns
    blocked_hosts: tuple[str, ...] = ()
    resolve_timeout_s: float = 5.0
    resolver: Resolver | None = field(default=None, repr=False, compare=False)

    async def check_url(self, url: str) -> None:
        """Raise :class:`BlockedURL` unless ``url`` may be fetched (DNS is resolved)."""
        await self.resolve(url)

    def check_host_lists(self, url: httpx.URL) -> None:
        """Scheme/credentials/host-list/metadata-name rules; no DNS."""
        host = url.raw_host.decode("ascii")
        host_port = format_host_port(host, effective_port(url))
        if self.blocked_hosts and host_matches(host_port, self.blocked_hosts):
            raise BlockedURL(f"host {url.host!r} is blocked")
        if self.allowed_hosts and not host_matches(host_port, self.allowed_hosts):
            raise BlockedURL(f"host {url.host!r} is not in the allowed hosts")
        if not self.allow_private and host.rstrip(".").lower() in METADATA_HOSTS:
            raise BlockedURL(f"host {url.host!r} is a cloud metadata service")

    def check_without_dns(self, url: str | httpx.URL) -> httpx.URL:
        """Every rule that needs no DNS: scheme, credentials, host lists, metadata
        names, and the address itself when the host is an IP literal (in any form a
        resolver accepts, see :func:`parse_ip_literal`). Returns the parsed URL.
        Cheap and synchronous; :meth:`resolve` runs it first."""
        parsed = parse_http_url(url)
        self.check_host_lists(parsed)
        literal = parse_ip_literal(parsed.raw_host.decode("ascii"))
        if literal is not None and not self.allow_private:
            why = address_refusal(literal)
            if why is not None:
                written = parsed.host
                shown = written if written == str(literal) else f"{written} (= {literal})"
                raise BlockedURL(f"{shown} is {why}")
        return parsed

    async def resolve(self, url: str | httpx.URL) -> Target:
        """Check ``url`` completely and return the addresses that were approved."""
        parsed = self.check_without_dns(url)
        host = parsed.raw_host.decode("ascii")
        port = effective_port(parsed)
        literal = parse_ip_literal(host)
        if literal is not None:
            addresses: tuple[str, ...] = (str(literal),)
        else:
            addresses = await self._lookup(host, port)
        if not self.allow_private:
            for address in addresses:
                why = address_refusal(ipaddress.ip_address(address))
                if why is None:
                    continue
                if literal is not None:
                    raise BlockedURL(f"{address} is {why}")
                raise BlockedURL(
                    f"host {parsed.host!r} resolves to {why}", detail=f"{host} -> {address}"
                )
        return Target(parsed, host, port, addresses, literal is not None)

    async def _lookup(self, host: str, port: int) -> tuple[str, ...]:
        resolver = self.resolver or _system_resolver
        try:
            async with asyncio.timeout(self.resolve_timeout_s):
                answers = await resolver(host, port)
        except TimeoutError as exc:
            raise MediaError(f"timed out resolving host {host!r}") from exc
        except OSError as exc:  # socket.gaierror and friends
            raise MediaError(f"could not resolve host {host!r}") from exc
        except UnicodeError as exc:  # getaddrinfo's IDNA step: a label over 63 characters
            raise MediaError(f"could not resolve host {host[:80]!r}: not a valid name") from exc
        seen: dict[str, None] = {}
        for answer in answers:
            try:
                address = str(ipaddress.ip_address(answer.split("%", 1)[0]))
            except ValueError as exc:
                raise MediaError(f"could not resolve host {host!r}") from exc
            seen.setdefault(address)
        if not seen:
            raise MediaError(f"could not resolve host {host!r}")
        return tuple(seen)
