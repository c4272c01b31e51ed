"""A provider that forwards every call to an inner one: the base of cross-cutting
wrappers (metrics, breaker bookkeeping, rate limits), which override only the
calls they care about, as pydantic-ai's WrapperModel does."""

from __future__ import annotations

from common import media

from .base import (
    BaseProvider,
    Capabilities,
    GenerationRequest,
    Provider,
    ProviderSettings,
    UpstreamJob,
)


class WrapperProvider(BaseProvider):
    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        # Fixed for an adapter's lifetime, so copied once rather than forwarded.
        self.name = inner.name
        self.capabilities: Capabilities = inner.capabilities
        self.settings: ProviderSettings = inner.settings

    @property
    def wrapped(self) -> Provider:
        """The innermost provider (the adapter itself)."""
        inner = self.inner
        while isinstance(inner, WrapperProvider):
            inner = inner.inner
        return inner

    async def submit(self, req: GenerationRequest) -> UpstreamJob:
        return await self.inner.submit(req)

    async def poll(self, job: UpstreamJob) -> UpstreamJob:
        return await self.inner.poll(job)

    async def cancel(self, job: UpstreamJob) -> bool:
        return await self.inner.cancel(job)

    def attempt_cost_micro_usd(self, req: GenerationRequest, job: UpstreamJob | None) -> int:
        return self.inner.attempt_cost_micro_usd(req, job)

    async def download(self, url: str) -> tuple[bytes, str | None]:
        return await self.inner.download(url)

    async def download_to(self, url: str, sink: media.Sink) -> str | None:
        return await self.inner.download_to(url, sink)

    def saturated(self) -> bool:
        return self.inner.saturated()

    async def aclose(self) -> None:
        await self.inner.aclose()
