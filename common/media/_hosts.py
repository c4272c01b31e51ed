"""Host pattern matching for allow/deny lists."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import httpx

_BASE = httpx.URL("http://placeholder.invalid/")


def _encode_host(host: str) -> str:
    """Canonical ASCII form, exactly as httpx will put it on the wire (IDNA 2008)."""
    host = host.rstrip(".")
    try:
        return str(ipaddress.ip_address(host))  # canonical IPv4/IPv6 text
    except ValueError:
        pass
    try:
        return _BASE.copy_with(host=host).raw_host.decode("ascii").lower()
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        raise ValueError(f"invalid host {host!r}") from exc


def split_host(value: str) -> tuple[str, int | None]:
    """``"Host:8080"`` / ``"[::1]:8080"`` / ``"::1"`` -> (canonical host, port or None).

    Raises ``ValueError`` for anything unparsable. A leading ``*.`` is kept.
    """
    text = value.strip()
    port: int | None = None
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ValueError(f"invalid host {value!r}")
        rest, text = text[end + 1 :], text[1:end]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid host {value!r}")
            port = _port(rest[1:])
    elif text.count(":") == 1:
        text, _, raw_port = text.partition(":")
        port = _port(raw_port)
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    if not text:
        raise ValueError(f"invalid host {value!r}")
    host = _encode_host(text)
    return ("*." + host if wildcard else host), port


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port {text!r}")
    return int(text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` (optionally ``host:port``) matches any of ``patterns``.

    Patterns: ``example.com`` (any port), ``example.com:8443`` (that port
    only), ``*.example.com`` (strict subdomains: not the apex, not
    ``evil-example.com``). Case-insensitive; IDN hosts and patterns are both
    compared in their IDNA (punycode) form; a trailing dot is ignored; IP
    literals compare canonically and never match wildcards. Unparsable hosts
    match nothing; unparsable patterns are skipped.
    """
    try:
        name, port = split_host(host)
    except ValueError:
        return False
    if name.startswith("*."):
        return False
    name_is_ip = _is_ip(name)
    for pattern in patterns:
        try:
            pat, pat_port = split_host(pattern)
        except ValueError:
            continue
        if pat_port is not None and pat_port != port:
            continue
        if pat.startswith("*."):
            suffix = pat[1:]  # ".example.com"
            if not name_is_ip and name.endswith(suffix) and len(name) > len(suffix):
                return True
        elif name == pat:
            return True
    return False


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
