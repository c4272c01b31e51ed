"""A Provider wrapper that times every upstream call into Prometheus.

Adapters stay free of metrics; the service wraps each one once at start-up.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from providers.base import (
    Capabilities,
    GenerationRequest,
    Provider,
    ProviderError,
    ProviderSettings,
    UpstreamJob,
)

from . import metrics

T = TypeVar("T")


class InstrumentedProvider:
    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.name: str = inner.name
        self.capabilities: Capabilities = inner.capabilities
        self.settings: ProviderSettings = inner.settings

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

    def attempt_cost_micro_usd(self, req: GenerationRequest, job: UpstreamJob | None) -> int:
        return self.inner.attempt_cost_micro_usd(req, job)

    async def download(self, url: str) -> tuple[bytes, str | None]:
        return await self._timed("download", self.inner.download(url))

    def saturated(self) -> bool:
        check = getattr(self.inner, "saturated", None)
        return bool(check()) if check is not None else False

    async def aclose(self) -> None:
        await self.inner.aclose()
