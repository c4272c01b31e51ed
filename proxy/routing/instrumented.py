"""A Provider wrapper that times every upstream call into Prometheus and logs every
failed one (`upstream.error`).

Adapters stay free of metrics; the app wraps each one once at start-up.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from common import media
from common.logging import get_logger
from providers.base import ErrorKind, GenerationRequest, ProviderError, UpstreamJob
from providers.wrapper import WrapperProvider
from proxy import metrics

T = TypeVar("T")
log = get_logger("flux_proxy.upstream")


def _log_error(provider: str, operation: str, exc: ProviderError) -> None:
    """`upstream.error`: what failed, its class, kind and HTTP status. Never a key, a
    header or a body: the message is the client-safe one (common/logging.py scrubs
    keys and inline image data from every line besides)."""
    fields: dict[str, Any] = {
        "provider": provider, "operation": operation, "error_class": type(exc).__name__,
        "error_kind": exc.kind.value, "http_status": exc.status_code, "error": exc.message}
    if exc.upstream_code is not None:
        fields["upstream_code"] = exc.upstream_code
    if exc.retry_after is not None:
        fields["retry_after_s"] = exc.retry_after
    refused = exc.kind in (ErrorKind.AUTH, ErrorKind.CONFIG)  # ours to fix
    (log.error if refused else log.warning)("upstream.error", **fields)


class InstrumentedProvider(WrapperProvider):
    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await call
        except ProviderError as exc:
            outcome = exc.kind.value
            _log_error(self.name, operation, exc)
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            metrics.UPSTREAM_LATENCY.labels(self.name, operation, outcome).observe(
                time.perf_counter() - start
            )

    async def submit(self, req: GenerationRequest) -> UpstreamJob:
        return await self._timed("submit", self.inner.submit(req))

    async def poll(self, job: UpstreamJob) -> UpstreamJob:
        return await self._timed("poll", self.inner.poll(job))

    async def cancel(self, job: UpstreamJob) -> bool:
        return await self._timed("cancel", self.inner.cancel(job))

    async def download(self, url: str) -> tuple[bytes, str | None]:
        return await self._timed("download", self.inner.download(url))

    async def download_to(self, url: str, sink: media.Sink) -> str | None:
        return await self._timed("download", self.inner.download_to(url, sink))
