"""Bounded, guarded HTTP downloads and the one-call ``fetch_image``.

DNS rebinding: a hostname that resolved to a public address while it was
checked may resolve to 127.0.0.1 a millisecond later, when the HTTP client
connects. ``download`` therefore never lets httpx resolve names: it rewrites
each request to the address the guard approved, keeps the original name in
the ``Host`` header, and for https passes it as the TLS server name
(httpcore's ``sni_hostname`` extension), so certificates are still verified
against the real hostname.

Memory: the body's bytes are reserved from a :class:`~common.media.budget.ByteBudget`
(the process-wide ``downloads()`` unless one is given) once the response headers
are in and before the body is read: its Content-Length, or for a body without one
(or with a Content-Encoding, which httpx inflates) ``max_bytes``. The body is read
into one buffer of exactly that size, never grown, whose pages become resident as
they are written; the unused rest is returned when the body ends. Waiting for the
budget counts against ``timeout_s``. See common/media/budget.py for why the reservation is whole.

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
import io
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from . import budget as _budget
from ._datauri import parse_data_uri
from ._errors import BlockedURL, MediaError, TooLarge
from ._guard import OutboundGuard, Target, effective_port, parse_http_url
from ._hosts import format_host_port, host_matches
from ._images import ImageInfo, decode_cost, inspect_image, read_header

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
    budget: _budget.ByteBudget | None = None,
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
    * ``budget`` (default: the process-wide ``budget.downloads()``) counts the
      body while it is read; inside ``budget.holding()`` it stays counted after
      the return, until that block ends (the caller still holds the bytes).
      A body that can never fit the budget is :class:`~common.media.budget.OverBudget`.
    """
    checker = guard if guard is not None else OutboundGuard()
    patterns = tuple(allowed_hosts or ())
    pool = budget if budget is not None else _budget.downloads()
    outer = _budget.held_claim(pool)
    claim = outer if outer is not None else _budget.Claim(pool)
    try:
        async with asyncio.timeout(timeout_s):
            current = parse_http_url(url)
            for _hop in range(max(0, max_redirects) + 1):
                _check_allowed(current, patterns)
                target = await checker.resolve(current)
                result = await _get_once(client, target, max_bytes=max_bytes, claim=claim)
                if not isinstance(result, _Redirect):
                    return result
                try:
                    current = parse_http_url(current.join(result.location))
                except httpx.InvalidURL as exc:
                    raise MediaError("image URL redirected to a malformed URL") from exc
            raise MediaError(f"image URL redirected more than {max_redirects} times")
    except TimeoutError as exc:
        if claim.gave_up_waiting:
            raise MediaError(
                f"image download waited {timeout_s:g}s for memory: the process's "
                f"{pool.name} ({pool.capacity} bytes) stayed in use by other downloads"
            ) from exc
        raise MediaError(f"image download did not finish within {timeout_s:g}s") from exc
    finally:
        if outer is None:
            claim.release()


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
    client: httpx.AsyncClient, target: Target, *, max_bytes: int, claim: _budget.Claim
) -> tuple[bytes, str | None] | _Redirect:
    last_error: Exception | None = None
    for address in target.addresses[:_MAX_ADDRESSES_TRIED]:
        url, headers, extensions = _pinned(target, address)
        try:
            async with client.stream(
                "GET", url, headers=headers, extensions=extensions, follow_redirects=False
            ) as response:
                return await _consume(response, max_bytes=max_bytes, claim=claim)
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
    response: httpx.Response, *, max_bytes: int, claim: _budget.Claim
) -> tuple[bytes, str | None] | _Redirect:
    status = response.status_code
    if status in _REDIRECT_STATUSES:
        location = response.headers.get("location")
        if not location:
            raise MediaError(f"image URL answered HTTP {status} without a Location")
        return _Redirect(location)
    if not 200 <= status < 300:
        raise MediaError(f"image URL answered HTTP {status}")
    sent = _content_length(response)
    if sent is not None and sent > max_bytes:
        raise TooLarge(f"image is larger than {max_bytes} bytes")
    # With a Content-Encoding httpx inflates the body: its length is then unknown.
    encoding = response.headers.get("content-encoding", "").strip().lower()
    declared = sent if encoding in ("", "identity") else None
    # One buffer of the whole reservation, never grown (no realloc copies): bytes(n)
    # is calloc'd, so its pages become resident only as the body fills them, and
    # BytesIO writes into it in place (it holds the only reference) and getvalue()
    # hands it over trimmed, without a copy.
    limit = declared if declared is not None else min(max_bytes, claim.budget.capacity)
    await claim.reserve(limit, what="the image download")
    buffer = io.BytesIO(bytes(limit))
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                if declared is not None:
                    raise MediaError(
                        f"image host sent more than its Content-Length ({declared})")
                raise TooLarge(f"image is larger than {limit} bytes")
            buffer.write(chunk)
    except BaseException:
        # The exception's traceback keeps this frame, and so the buffer, alive after
        # the reservation is returned: free the memory now.
        buffer.close()
        raise
    if size != limit:
        buffer.truncate(size)
    body = buffer.getvalue()
    del buffer
    claim.give_back(limit - size)
    return body, response.headers.get("content-type")


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


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

    Memory: a downloaded body stays counted in ``budget.downloads()`` until the
    image is checked, and the decode reserves its pixels from
    ``budget.decoding()`` first (waits count against ``timeout_s``); the bytes
    returned are the caller's, uncounted.
    """
    try:
        text = url.strip()
        if not text:
            raise MediaError("image URL is empty")
        with _budget.holding(_budget.downloads()):
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
            try:
                fmt, width, height = read_header(data, max_pixels=max_pixels,
                                                 max_side=max_side)
            except MediaError:
                del data  # not kept alive by the traceback after the budget is returned
                raise
            info = await _budget.decoding().run(
                decode_cost(fmt, width, height), inspect_image, data, what="decoding the image",
                wait_s=timeout_s, max_pixels=max_pixels, max_side=max_side)
    except MediaError as exc:
        exc.field = field
        raise
    return data, info
