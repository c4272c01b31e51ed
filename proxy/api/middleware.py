"""The app's own middleware: HTTP metrics and compression, cheap on the hot path.

* :class:`HttpMetrics` writes ``flux_proxy_http_*`` exactly as litestar's
  ``PrometheusMiddleware`` did (same names, labels, help, buckets; ``path`` is the
  route template; in-progress carries ``status_code="200"`` as it did), but keeps the
  children of each label set instead of building a ``Request``, two label dicts and
  four ``.labels()`` lookups (each a lock) per request.
* :class:`SmallBodyCompression` is litestar's ``CompressionMiddleware`` (gzip at
  ``minimum_size`` and over), except that a response whose whole body is one message
  under ``minimum_size`` (nearly every API answer) passes without a compressor: litestar
  builds a ``GzipFile`` per request before it knows the size.
"""

from __future__ import annotations

import time
from typing import Any

from litestar.enums import CompressionEncoding
from litestar.middleware.compression import CompressionMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from proxy.metrics import LATENCY_BUCKETS, NS

_MAX_CHILDREN = 4096  # label sets kept; routes, methods and statuses are few

# The names, labels and help texts litestar's PrometheusMiddleware wrote (the dashboards
# query them). Defined here, not in proxy/metrics.py: that module is the proxy's own
# metrics, each of which has a dashboard panel (tests/test_dashboards.py).
HTTP_PREFIX = f"{NS}_http"
HTTP_LABELS = ("method", "path", "status_code", "app_name")
HTTP_REQUESTS = Counter(f"{HTTP_PREFIX}_requests_total", "Total requests", HTTP_LABELS)
HTTP_REQUEST_DURATION = Histogram(
    f"{HTTP_PREFIX}_request_duration_seconds", "Request duration, in seconds", HTTP_LABELS,
    buckets=LATENCY_BUCKETS,  # past sync_timeout_s: the default buckets stop at 10 s
)
HTTP_IN_PROGRESS = Gauge(
    f"{HTTP_PREFIX}_requests_in_progress", "Total requests currently in progress",
    HTTP_LABELS, multiprocess_mode="livesum",
)
HTTP_ERRORS = Counter(f"{HTTP_PREFIX}_requests_error_total", "Total errors in requests",
                      HTTP_LABELS)


class HttpMetrics:
    """Per-route request count, duration, in-progress and 5xx count (``/metrics`` excluded)."""

    def __init__(self, app: ASGIApp, *, app_name: str = "flux_proxy",
                 exclude: str = "/metrics") -> None:
        self.app = app
        self.app_name = app_name
        self.exclude = exclude  # a substring of the path, as litestar's pattern search was
        self._done: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._running: dict[tuple[str, str], Any] = {}

    def _child(self, metric: MetricWrapperBase, method: str, path: str, status: int) -> Any:
        return metric.labels(method, path, str(status), self.app_name)

    def _finished(self, method: str, path: str, status: int) -> tuple[Any, Any, Any]:
        key = (method, path, status)
        found = self._done.get(key)
        if found is None:
            found = (self._child(HTTP_REQUESTS, method, path, status),
                     self._child(HTTP_REQUEST_DURATION, method, path, status),
                     self._child(HTTP_ERRORS, method, path, status))
            if len(self._done) < _MAX_CHILDREN:
                self._done[key] = found
        return found

    def _in_progress(self, method: str, path: str) -> Any:
        key = (method, path)
        found = self._running.get(key)
        if found is None:
            found = self._child(HTTP_IN_PROGRESS, method, path, 200)
            if len(self._running) < _MAX_CHILDREN:
                self._running[key] = found
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exclude in scope["path"]:
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path_template"]  # type: ignore[typeddict-item]
        start = time.perf_counter()
        status = 200
        duration = 0.0

        async def timed_send(message: Message) -> None:
            nonlocal status, duration
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]  # type: ignore[typeddict-item]
            elif kind == "http.response.body":
                duration = time.perf_counter() - start
            await send(message)

        running = self._in_progress(method, path)
        running.inc()
        try:
            await self.app(scope, receive, timed_send)
        finally:
            running.dec()
            count, latency, errors = self._finished(method, path, status)
            if status >= 500:
                errors.inc()
            count.inc()
            latency.observe(duration)


class SmallBodyCompression(CompressionMiddleware):
    """Litestar's compression, without a compressor for a small one-message body."""

    def create_compression_send_wrapper(
        self, send: Send, compression_encoding: CompressionEncoding | str, scope: Scope,
    ) -> Send:
        minimum = self.config.minimum_size
        start: Message | None = None
        passed = False  # a small complete body went out as it was
        inner: Send | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal start, passed, inner
            if inner is not None:
                await inner(message)
                return
            if passed:
                await send(message)
                return
            if message["type"] == "http.response.start":
                start = message
                return
            if (start is not None and message["type"] == "http.response.body"
                    and not message.get("more_body")
                    and len(message.get("body", b"")) < minimum):
                passed = True
                await send(start)
                await send(message)
                return
            # Big or streamed: litestar's wrapper, from the start message on.
            inner = super(SmallBodyCompression, self).create_compression_send_wrapper(
                send, compression_encoding, scope)
            if start is not None:
                await inner(start)
            await inner(message)

        return send_wrapper
