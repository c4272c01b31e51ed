"""A guarded download streamed to a sink, never held whole: the same SSRF rules,
address pinning and redirect checks as ``download``, a size cap enforced as the
body arrives, each chunk handed on as it comes. For copying outputs into a store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import httpx

from ._download import _MAX_ADDRESSES_TRIED, _REDIRECT_STATUSES, _check_allowed, _pinned
from ._errors import MediaError, TooLarge
from ._guard import OutboundGuard, Target, parse_http_url

Sink = Callable[[bytes], Awaitable[None]]


async def download_to(
    client: httpx.AsyncClient,
    url: str,
    sink: Sink,
    *,
    max_bytes: int,
    timeout_s: float,
    allowed_hosts: Iterable[str] | None = None,
    guard: OutboundGuard | None = None,
    max_redirects: int = 3,
) -> str | None:
    """GET ``url``, awaiting ``sink(chunk)`` for each piece of the body; the
    content-type. ``guard``, ``allowed_hosts``, redirects and ``timeout_s`` as in
    :func:`download`; :class:`TooLarge` as soon as more than ``max_bytes`` came
    (what the sink got until then is the caller's to discard). An exception the
    sink raises propagates as it is."""
    checker = guard if guard is not None else OutboundGuard()
    patterns = tuple(allowed_hosts or ())
    try:
        async with asyncio.timeout(timeout_s):
            current = parse_http_url(url)
            for _hop in range(max(0, max_redirects) + 1):
                _check_allowed(current, patterns)
                target = await checker.resolve(current)
                location = await _get_to(client, target, sink, max_bytes)
                if isinstance(location, tuple):
                    return location[0]
                try:
                    current = parse_http_url(current.join(location))
                except httpx.InvalidURL as exc:
                    raise MediaError("image URL redirected to a malformed URL") from exc
            raise MediaError(f"image URL redirected more than {max_redirects} times")
    except TimeoutError as exc:
        raise MediaError(f"image download did not finish within {timeout_s:g}s") from exc


async def _get_to(client: httpx.AsyncClient, target: Target, sink: Sink, max_bytes: int
                  ) -> tuple[str | None] | str:
    """(content-type,) when the body went to the sink; a redirect's Location."""
    last_error: Exception | None = None
    for address in target.addresses[:_MAX_ADDRESSES_TRIED]:
        pinned, headers, extensions = _pinned(target, address)
        try:
            async with client.stream("GET", pinned, headers=headers, extensions=extensions,
                                     follow_redirects=False) as response:
                status = response.status_code
                if status in _REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise MediaError(f"image URL answered HTTP {status} without a Location")
                    return location
                if not 200 <= status < 300:
                    raise MediaError(f"image URL answered HTTP {status}")
                declared = response.headers.get("content-length", "").strip()
                if declared.isdigit() and int(declared) > max_bytes:
                    raise TooLarge(f"image is larger than {max_bytes} bytes")
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"image is larger than {max_bytes} bytes")
                    await sink(chunk)
                return (response.headers.get("content-type"),)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last_error = exc  # the next approved address
        except httpx.TimeoutException as exc:
            raise MediaError("image host timed out") from exc
        except httpx.HTTPError as exc:
            raise MediaError("could not download the image",
                             detail=f"{type(exc).__name__}: {exc}") from exc
    raise MediaError("could not connect to the image host",
                     detail=f"{type(last_error).__name__}: {last_error}" if last_error else None,
                     ) from last_error
