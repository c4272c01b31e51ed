"""A guarded POST: the request goes to an address the guard approved (as
``download`` does), redirects are never followed, and at most a little of the
answer is read. For webhooks: a receiver's URL is the client's, so it gets the
same SSRF rules as every other URL the proxy fetches on a client's behalf."""

from __future__ import annotations

import asyncio

import httpx

from ._download import _MAX_ADDRESSES_TRIED, _pinned
from ._errors import MediaError
from ._guard import OutboundGuard

_READ_AT_MOST = 64 * 1024  # of the receiver's answer: only its status matters


async def post(client: httpx.AsyncClient, url: str, *, content: bytes,
               headers: dict[str, str], guard: OutboundGuard, timeout_s: float) -> int:
    """POST ``content`` to ``url`` and return the HTTP status. ``timeout_s`` bounds
    everything (DNS, connect, the answer). Raises :class:`BlockedURL` when the guard
    refuses the URL and :class:`MediaError` when no answer came."""
    try:
        async with asyncio.timeout(timeout_s):
            target = await guard.resolve(url)
            last_error: Exception | None = None
            for address in target.addresses[:_MAX_ADDRESSES_TRIED]:
                pinned, base_headers, extensions = _pinned(target, address)
                base_headers.pop("Accept", None)
                base_headers.pop("Accept-Encoding", None)
                try:
                    async with client.stream("POST", pinned, content=content,
                                             headers={**base_headers, **headers},
                                             extensions=extensions,
                                             follow_redirects=False) as response:
                        read = 0
                        async for chunk in response.aiter_raw():
                            read += len(chunk)
                            if read >= _READ_AT_MOST:
                                break
                        return response.status_code
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    last_error = exc  # the next approved address
                except httpx.HTTPError as exc:
                    raise MediaError(f"no answer: {type(exc).__name__}") from exc
            raise MediaError(f"could not connect: {type(last_error).__name__}") from last_error
    except TimeoutError as exc:
        raise MediaError(f"no answer within {timeout_s:g}s") from exc
