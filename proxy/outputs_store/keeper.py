"""Copy a prediction's outputs into the store, serve them back, and enforce retention.

`keep` runs when a prediction has completed and before its end is written
(runner.py), so the URLs the client hears of already work. Each output is streamed
from its provider into the store as it downloads (`Provider.download_to`: only from
its asset hosts, through the outbound guard, within `max_download_bytes` and
`download_timeout_s`; at most `output_store_max_bytes`, and never held whole: a
local file is written a megabyte at a time, an S3 object spooled to a temporary
file past 8 MiB), its first bytes checked to be an image, and committed (renamed
into place / PUT); all of one prediction's outputs at once, each within
`copy_timeout_s`. An output that cannot be kept (too large, not an image, the
download or the write failed, too slow) keeps its provider URL: the prediction still
completes. Each outcome is counted in `flux_proxy_output_copies_total{result}`.

Data URIs (``enable_base64_output``, or an upstream that only answers inline) are
left as they are: the client already holds the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from common import media
from common.logging import get_logger
from providers.base import Provider, ProviderError
from proxy import metrics
from proxy.outputs_store import signing
from proxy.outputs_store.backend import Backend, Blob, StoreError, valid_name

log = get_logger("flux_proxy.outputs")

PATH = "/v1/predictions/{id}/outputs/{n}"
SWEEP_MAX_ENTRIES = 10_000  # directory entries or objects looked at per sweep
SNIFF_BYTES = 64  # enough of the head for every format's magic bytes


def output_path(prediction_id: str, n: int) -> str:
    """What a prediction's row holds for a kept output: the proxy's own route, relative
    (rendered absolute with the base URL of whoever asks, render.output_urls)."""
    return PATH.format(id=prediction_id, n=n)


class _NotKept(Exception):
    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


class OutputStore:
    def __init__(self, backend: Backend, *, max_bytes: int, retention_s: float,
                 copy_timeout_s: float, sweep_interval_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self.copy_timeout_s = copy_timeout_s
        self.sweep_interval_s = sweep_interval_s
        self.clock = clock  # unix seconds; tests move it
        # Set by the app from the key-hash secret: listed URLs are signed (signing.py).
        self.signing_key: bytes | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ copying

    async def keep(self, provider: Provider, prediction_id: str, outputs: list[str]
                   ) -> list[str]:
        """`outputs` with each http(s) URL that could be copied replaced by its
        `output_path`; the others as they were."""
        if not valid_name(prediction_id, len(outputs) - 1):
            return outputs
        return list(await asyncio.gather(*(
            self._keep_one(provider, prediction_id, n, url) for n, url in enumerate(outputs))))

    async def _keep_one(self, provider: Provider, prediction_id: str, n: int, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            return url
        try:
            async with asyncio.timeout(self.copy_timeout_s):
                size = await self._copy(provider, prediction_id, n, url)
        except _NotKept as exc:
            result, reason = exc.result, exc.reason
        except TimeoutError:
            result, reason = "timeout", f"not copied within {self.copy_timeout_s:g}s"
        else:
            metrics.OUTPUT_COPIES.labels("stored").inc()
            log.debug("output.stored", prediction_id=prediction_id, n=n, bytes=size,
                      provider=provider.name)
            return self.listed_path(prediction_id, n)
        metrics.OUTPUT_COPIES.labels(result).inc()
        log.warning("output.copy_failed", prediction_id=prediction_id, n=n,
                    provider=provider.name, result=result, reason=reason,
                    message="the client gets the provider's URL for this output")
        return url

    def listed_path(self, prediction_id: str, n: int) -> str:
        """What the row holds for a kept output: its path, signed until the output's
        retention ends when a signing key is set."""
        path = output_path(prediction_id, n)
        if self.signing_key is None:
            return path
        return signing.signed(self.signing_key, path, int(self.clock() + self.retention_s))

    def signature_valid(self, path: str, expires: str, sig: str) -> bool:
        return self.signing_key is not None and signing.valid(
            self.signing_key, path, expires, sig, self.clock())

    async def _copy(self, provider: Provider, prediction_id: str, n: int, url: str) -> int:
        """Stream the output into the store as it downloads (never held whole), capped
        at `max_bytes`; its first bytes decide that it is an image and its type."""
        try:
            out = await self.backend.writer(prediction_id, n)
        except StoreError as exc:
            raise _NotKept("store_failed", str(exc)) from exc
        head = bytearray()
        size = 0

        async def sink(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            if size > self.max_bytes:
                raise _NotKept("too_large", f"over output_store_max_bytes ({self.max_bytes})")
            if len(head) < SNIFF_BYTES:
                head.extend(chunk[:SNIFF_BYTES - len(head)])
            try:
                await out.write(chunk)
            except StoreError as exc:
                raise _NotKept("store_failed", str(exc)) from exc

        try:
            try:
                await provider.download_to(url, sink)
            except ProviderError as exc:
                if isinstance(exc.__cause__, media.TooLarge):
                    raise _NotKept("too_large", exc.message) from exc
                raise _NotKept("download_failed", exc.message) from exc
            # What the bytes are, not what the host declared, sets the content type.
            fmt = media.sniff_format(bytes(head))
            if fmt is None:
                raise _NotKept("not_image", "not a JPEG, PNG, GIF or WebP image")
            try:
                await out.commit(fmt)
            except StoreError as exc:
                raise _NotKept("store_failed", str(exc)) from exc
        except BaseException:
            with contextlib.suppress(Exception):
                await out.abort()
            raise
        return size

    # ------------------------------------------------------------------ serving

    async def open(self, prediction_id: str, n: int) -> Blob | None:
        """Output `n` of a prediction, opened; None when it was never kept, was
        deleted, or is past retention (a sweep may not have reached it yet)."""
        if not valid_name(prediction_id, n):
            return None
        try:
            blob = await self.backend.get(prediction_id, n)
        except StoreError as exc:
            log.warning("output.read_failed", prediction_id=prediction_id, n=n,
                        error=str(exc))
            raise
        if blob is not None and blob.created + self.retention_s <= self.clock():
            await blob.aclose()
            return None
        return blob

    # ------------------------------------------------------------------ retention

    async def sweep(self, max_entries: int = SWEEP_MAX_ENTRIES) -> int:
        """Delete what is past retention (bounded work); how many outputs went."""
        removed = await self.backend.sweep(self.clock() - self.retention_s, max_entries)
        if removed:
            log.info("outputs.swept", removed=removed, store=self.backend.description)
        return removed

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="output-sweeper")

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # a full disk or an unreachable bucket: try again later
                log.exception("outputs.sweep_failed", store=self.backend.description)
            await asyncio.sleep(self.sweep_interval_s)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.backend.aclose()
