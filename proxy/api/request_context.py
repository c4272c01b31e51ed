"""Every response's request id and proxy overhead; every log line's request id.

:class:`RequestContext` wraps the whole ASGI app (proxy/app.py puts it around
litestar's own handler, so 404s, 405s, guard 401s and error pages pass through
it too), raw ASGI with no ``Request`` object:

* ``x-request-id``: the client's own when it sent a sane one (1 to 128 characters
  of ``A-Z a-z 0-9 . _ : / + = -``), else a new one (32 random hex digits). It is bound as
  ``request_id`` in structlog's context for the request, so every line logged while
  serving it carries it, and so do the lines of the prediction it submitted (the
  task that drives a prediction is created inside the request and copies the
  context).
* ``x-flux-proxy-overhead-ms``: the time the proxy itself spent on the request, in
  milliseconds with two decimals: its wall time (first byte in to the response
  start) less the time the request spent waiting on upstream attempts. A handler
  that waits for its prediction (sync mode, every surface: `submitting.finish_sync`)
  records that wait with :func:`waited_on`: the union of the prediction's attempts'
  intervals ``[created_at, completed_at]`` (a still-open attempt: until now), clipped
  to the request's own window and to the prediction's end. Any other request
  (202 answers, reads, errors) has nothing subtracted: its overhead is its wall
  time.
* ``flux_proxy_overhead_seconds{surface, mode}`` observes that overhead for the
  requests that submit a prediction (the POST routes of each surface that create
  one: answered below 400, or waited on), mode ``sync`` when the handler waited,
  else ``async``.
"""

from __future__ import annotations

import os
import re
import time
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Histogram

from proxy import metrics

if TYPE_CHECKING:
    from collections.abc import Iterable

    from proxy.lifecycle.run import Run
    from proxy.store.models import Attempt

REQUEST_ID_HEADER = "x-request-id"
OVERHEAD_HEADER = "x-flux-proxy-overhead-ms"
_REQUEST_ID = REQUEST_ID_HEADER.encode()
_OVERHEAD = OVERHEAD_HEADER.encode()
_SANE_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")


class Timing:
    """What the handler tells the middleware about one request: how long it waited
    on upstream attempts, and whether it waited at all (sync)."""

    __slots__ = ("mode", "start", "upstream_s")

    def __init__(self, start: float) -> None:
        self.start = start  # time.perf_counter() when the request came in
        self.upstream_s = 0.0
        self.mode = "async"


_timing: ContextVar[Timing | None] = ContextVar("flux_proxy_request_timing", default=None)


def request_id_of(scope: Scope) -> str:
    """The client's x-request-id when it is sane, else a new one."""
    for name, value in scope["headers"]:
        if name == _REQUEST_ID:
            if _SANE_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return os.urandom(16).hex()


def prediction_surface(method: str, path: str) -> str | None:
    """The surface of a request that submits a prediction, None for any other route."""
    if method != "POST":
        return None
    if path == "/v1/predictions":
        return "native"
    if path in ("/v1/images/generations", "/v1/images/edits"):
        return "openai"
    if path.startswith("/api/v3/") and not path.startswith(("/api/v3/media/",
                                                            "/api/v3/predictions/")):
        return "wavespeed"
    if path.startswith("/api/v1/models/") and path.endswith("/generate"):
        return "vibedream"
    return None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def upstream_seconds(attempts: Iterable[Attempt], since: datetime, until: datetime) -> float:
    """Seconds of [since, until] covered by at least one attempt's interval (an
    attempt still open counts until `until`): time a request waited on upstreams."""
    spans = sorted(
        (max(_aware(a.created_at), since), min(_aware(a.completed_at or until), until))
        for a in attempts)
    total = 0.0
    start: datetime | None = None
    end = since
    for s, e in spans:
        if e <= s:
            continue
        if start is None or s > end:
            if start is not None:
                total += (end - start).total_seconds()
            start, end = s, e
        elif e > end:
            end = e
    if start is not None:
        total += (end - start).total_seconds()
    return total


def waited_on(run: Run) -> None:
    """The handler waited for `run` (sync mode): record the upstream time of that wait
    for this request's overhead. Outside a request (no middleware): nothing."""
    timing = _timing.get()
    if timing is None:
        return
    now = datetime.now(UTC)
    since = now - timedelta(seconds=time.perf_counter() - timing.start)
    ended = run.pred.completed_at
    until = min(now, _aware(ended)) if ended is not None else now
    timing.mode = "sync"
    timing.upstream_s = upstream_seconds(run.attempts, since, until)


class RequestContext:
    """x-request-id and x-flux-proxy-overhead-ms on every HTTP response; the request
    id bound in the log context while it is served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._overhead: dict[tuple[str, str], Histogram] = {}

    def _histogram(self, surface: str, mode: str) -> Histogram:
        key = (surface, mode)
        found = self._overhead.get(key)
        if found is None:
            found = self._overhead[key] = metrics.PROXY_OVERHEAD.labels(surface, mode)
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timing = Timing(time.perf_counter())
        request_id = request_id_of(scope)
        rid_header = (_REQUEST_ID, request_id.encode("ascii"))
        overhead_s = 0.0
        status = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal overhead_s, status
            if message["type"] == "http.response.start":
                status = message["status"]
                wall = time.perf_counter() - timing.start
                overhead_s = wall - min(timing.upstream_s, wall)
                message["headers"] = [
                    *message.get("headers", ()), rid_header,
                    (_OVERHEAD, f"{overhead_s * 1000:.2f}".encode("ascii"))]
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        token = _timing.set(timing)
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _timing.reset(token)
            structlog.contextvars.reset_contextvars(**tokens)
            if status and (timing.mode == "sync" or status < 400):
                surface = prediction_surface(scope["method"],  # type: ignore[typeddict-item]
                                             scope["path"])
                if surface is not None:
                    self._histogram(surface, timing.mode).observe(overhead_s)
