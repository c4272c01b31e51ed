"""The upstream clients' connection pool: httpcore's, with a cheaper bookkeeping pass.

`lean_pool()` swaps the class of an httpx client's own pool; it relies on httpx
0.28 / httpcore 1.0 internals (tests/test_http_pool.py checks the rules), and
`lean_pool = false` in a provider's settings keeps httpcore's stock pool.
"""

from __future__ import annotations

import math
import time

import httpcore
import httpx

from .base import ProviderSettings


class LeanConnectionPool(httpcore.AsyncConnectionPool):
    """httpcore's pool with a bookkeeping pass that costs O(connections + requests)
    of attribute checks per request, instead of the stock one's
    O(connections x idle connections) plus one `has_expired()` -- a getpeername
    and a poll(2) through anyio's stream attributes -- on every idle connection,
    twice per request (py-spy: half the CPU of a poll at 50 open connections).

    The same rules, checked where they matter:
    * a connection is reused only after `has_expired()` said no, just before it is
      handed out: never one idle past `keepalive_expiry` (the keep-alive race) nor
      one the server has closed;
    * every idle connection is checked at most `SWEEP_S` apart (any request
      triggers it), so expired ones are closed without waiting to be picked;
    * at most max_keepalive_connections idle ones are kept, at most max_connections
      in all; at the limit an idle one (another origin's) is closed for a new one.
    And one fix: a connection is handed to one waiting request at a time (the stock
    pass can give one idle connection to several, which then retry)."""

    SWEEP_S = 1.0
    _swept_at = -math.inf

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        closing: list[httpcore.AsyncConnectionInterface] = []
        now = time.monotonic()
        sweep = now - self._swept_at >= self.SWEEP_S
        if sweep:
            self._swept_at = now
        keep: list[httpcore.AsyncConnectionInterface] = []
        free: list[httpcore.AsyncConnectionInterface] = []  # idle
        for c in self._connections:
            if c.is_closed():
                continue
            if c.is_idle():
                if sweep and c.has_expired():
                    closing.append(c)
                    continue
                if len(free) >= self._max_keepalive_connections:
                    closing.append(c)
                    continue
                free.append(c)
            keep.append(c)
        self._connections = keep
        if not free and len(keep) >= self._max_connections:
            return closing  # all busy: nothing to hand out (no scan of the requests)
        # Connections already promised to a request that has not started on them
        # yet still read idle: not free.
        taken = {id(r.connection) for r in self._requests if r.connection is not None}
        queued = [r for r in self._requests if r.connection is None]
        if not queued:
            return closing
        if taken:
            free = [c for c in free if id(c) not in taken]

        for pool_request in queued:
            origin = pool_request.request.url.origin
            chosen = None
            for c in free:
                if c.can_handle_request(origin) and c.is_available():
                    free.remove(c)
                    if not sweep and c.has_expired():  # idle too long, or closed by the server
                        keep.remove(c)
                        closing.append(c)
                        continue
                    chosen = c
                    break
            if chosen is None:
                if len(keep) >= self._max_connections:
                    if not free:  # nothing to hand out, nothing to close for a new one
                        break
                    evicted = free.pop(0)
                    keep.remove(evicted)
                    closing.append(evicted)
                chosen = self.create_connection(origin)
                keep.append(chosen)
            pool_request.assign_to_connection(chosen)
        return closing


def lean_pool(client: httpx.AsyncClient, settings: ProviderSettings) -> httpx.AsyncClient:
    """`client`, its default transport on a LeanConnectionPool unless the settings say
    `lean_pool = false`. Only the pool class changes (the subclass adds no state): the
    client is built as before, so env proxies (trust_env), verify and the limits are
    httpx's; a transport passed in (tests) or a proxy mount is left as it is."""
    transport = getattr(client, "_transport", None)
    pool = getattr(transport, "_pool", None)
    if (settings.lean_pool and isinstance(transport, httpx.AsyncHTTPTransport)
            and type(pool) is httpcore.AsyncConnectionPool):
        pool.__class__ = LeanConnectionPool
    return client
