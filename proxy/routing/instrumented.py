"""A Provider wrapper that times every upstream call into Prometheus.

Adapters stay free of metrics; the app wraps each one once at start-up.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from providers.base import GenerationRequest, ProviderError, UpstreamJob
from providers.wrapper import WrapperProvider
from proxy import metrics

T = TypeVar("T")


class InstrumentedProvider(WrapperProvider):
    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await call
        except ProviderError as exc:
            outcome = exc.kind.value
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
