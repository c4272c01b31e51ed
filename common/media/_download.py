"""Bounded, guarded HTTP downloads and the one-call ``fetch_image``.

DNS rebinding: a hostname that resolved to a public address while it was
checked may resolve to 127.0.0.1 a millisecond later, when the HTTP client
connects. ``download`` therefore never lets httpx resolve names: it rewrites
each request to the address the guard approved, keeps the original name in
the ``Host`` header, and for https passes it as the TLS server name
(httpcore's ``sni_hostname`` extension), so certificates are still verified
against the real hostname.

Known limits:
* httpx pools connections per (scheme, IP, port): a pooled TLS connection
  opened for ``a.example`` may be reused for ``b.example`` on the same IP
  (same server, checked address); a strict server may answer 421.
* A client configured with a proxy (``proxy=`` / ``trust_env`` + env vars)
  makes the proxy do the connecting; the guard then only checks our own
  view of DNS. Give ``download`` a client without a proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from ._datauri import parse_data_uri
from ._errors import BlockedURL, MediaError, TooLarge
from ._guard import OutboundGuard, Target, effective_port, parse_http_url
from ._hosts import format_host_port, host_matches
from ._images import ImageInfo, inspect_image

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_ADDRESSES_TRIED = 4
_HEADERS = {
    "Accept": "image/*,*/*;q=0.5",
    # Ask for the raw bytes: a gzip body would be inflated in memory per chunk
    # before the size cap sees it. (Still counted after decoding if sent anyway.)
    "Accept-Encoding": "identity",
}


@dataclass(frozen=True)
class _Redirect:
    location: str


async def download(
    client: httpx.AsyncClient,
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allowed_hosts: Iterable[str] | None = None,
    guard: OutboundGuard | None = None,
    max_redirects: int = 3,
) -> tuple[bytes, str | None]:
    """GET ``url`` and return ``(body, content-type)``.

    * ``guard=None`` means the strict default ``OutboundGuard()`` (public
      addresses only), never "unchecked"; pass ``OutboundGuard(allow_private=True)``
      for loopback simulators and on-prem hosts.
    * ``allowed_hosts`` (patterns as in :func:`host_matches`) restricts every
      hop in addition to the guard's own lists; ``None`` or empty = no restriction.
    * Redirects (301/302/303/307/308) are followed here, at most
      ``max_redirects``, each hop checked again; the client's own redirect
      following is disabled per request.
    * ``timeout_s`` bounds everything: DNS, connects, redirects, body.
    * Raises :class:`TooLarge` past ``max_bytes`` (declared or streamed),
      :class:`BlockedURL` for refused hops, :class:`MediaError` otherwise.
    """
    checker = guard if guard is not None else OutboundGuard()
    patterns = tuple(allowed_hosts or ())
    try:
        async with asyncio.timeout(timeout_s):
            current = parse_http_url(url)
            for _hop in range(max(0, max_redirects) + 1):
                _check_allowed(current, patterns)
                target = await checker.resolve(current)
                result = await _get_once(client, target, max_bytes=max_bytes)
                if not isinstance(result, _Redirect):
                    return result
                try:
                    current = parse_http_url(current.join(result.location))
                except httpx.InvalidURL as exc:
                    raise MediaError("image URL redirected to a malformed URL") from exc
            raise MediaError(f"image URL redirected more than {max_redirects} times")
    except TimeoutError as exc:
        raise MediaError(f"image download did not finish within {timeout_s:g}s") from exc


def _check_allowed(url: httpx.URL, patterns: tuple[str, ...]) -> None:
    if patterns:
        host_port = format_host_port(url.raw_host.decode("ascii"), effective_port(url))
        if not host_matches(host_port, patterns):
            raise BlockedURL(f"host {url.host!r} is not in the allowed hosts")


def _pinned(target: Target, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """The request aimed at ``address``, still speaking to ``target.host``."""
    headers = dict(_HEADERS)
    if target.host_is_ip:
        # A non-canonical literal (127.1, 0x7f.1) is sent as the address it was checked as.
        url = target.url if target.host == address else target.url.copy_with(host=address)
        return url, headers, {}
    headers["Host"] = target.url.netloc.decode("ascii")
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    return target.url.copy_with(host=address), headers, extensions


async def _get_once(
    client: httpx.AsyncClient, target: Target, *, max_bytes: int
) -> tuple[bytes, str | None] | _Redirect:
    last_error: Exception | None = None
    for address in target.addresses[:_MAX_ADDRESSES_TRIED]:
        url, headers, extensions = _pinned(target, address)
        try:
            async with client.stream(
                "GET", url, headers=headers, extensions=extensions, follow_redirects=False
            ) as response:
                return await _consume(response, max_bytes=max_bytes)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last_error = exc  # try the next approved address
        except httpx.TimeoutException as exc:
            raise MediaError("image host timed out") from exc
        except httpx.HTTPError as exc:
            raise MediaError(
                "could not download the image", detail=f"{type(exc).__name__}: {exc}"
            ) from exc
    raise MediaError(
        "could not connect to the image host",
        detail=f"{type(last_error).__name__}: {last_error}" if last_error else None,
    ) from last_error


async def _consume(
    response: httpx.Response, *, max_bytes: int
) -> tuple[bytes, str | None] | _Redirect:
    status = response.status_code
    if status in _REDIRECT_STATUSES:
        location = response.headers.get("location")
        if not location:
            raise MediaError(f"image URL answered HTTP {status} without a Location")
        return _Redirect(location)
    if not 200 <= status < 300:
        raise MediaError(f"image URL answered HTTP {status}")
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"image is larger than {max_bytes} bytes")
    size = 0
    chunks: list[bytes] = []
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"image is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks), response.headers.get("content-type")


async def fetch_image(
    client: httpx.AsyncClient,
    url: str,
    *,
    field: str,
    max_bytes: int,
    timeout_s: float,
    guard: OutboundGuard | None = None,
    allowed_hosts: Iterable[str] | None = None,
    max_pixels: int = 50_000_000,
    max_side: int = 8192,
) -> tuple[bytes, ImageInfo]:
    """A request's image input (``data:`` URI or http(s) URL) -> validated bytes.

    Whatever goes wrong is a :class:`MediaError` (or subclass) whose ``field``
    is ``field``. The declared Content-Type / data-URI type is not trusted:
    the decoded image decides. ``guard=None`` is the strict default guard.
    """
    try:
        text = url.strip()
        if not text:
            raise MediaError("image URL is empty")
        if text[:5].lower() == "data:":
            data = parse_data_uri(text, max_bytes=max_bytes)[0]
        else:
            data, _content_type = await download(
                client,
                text,
                max_bytes=max_bytes,
                timeout_s=timeout_s,
                allowed_hosts=allowed_hosts,
                guard=guard,
            )
        info = await asyncio.to_thread(
            inspect_image, data, max_pixels=max_pixels, max_side=max_side
        )
    except MediaError as exc:
        exc.field = field
        raise
    return data, info
