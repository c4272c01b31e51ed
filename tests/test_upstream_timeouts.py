"""An upstream that trickles its answer defeats a read timeout; the total bound
per call still ends it: a poll times out, a submit's outcome is unknown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from providers.base import (
    GenerationRequest,
    JobStatus,
    OutcomeUnknown,
    UpstreamJob,
    UpstreamTimeout,
)
from providers.registry import build_provider


@pytest.fixture
async def trickler() -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        try:
            for _ in range(100):  # bounded: one byte every 0.1 s, never a full body
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.1)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"
        server.close()


@pytest.mark.parametrize("kind", ["vibedream", "wavespeed"])
async def test_total_timeout_ends_a_trickling_answer(trickler: str, kind: str) -> None:
    provider = build_provider(kind, kind, {"base_url": trickler, "api_key": "k",
                                           "read_timeout_s": 0.5, "total_timeout_s": 0.6})
    req = GenerationRequest(prompt="p", seed=1)
    try:
        start = time.monotonic()
        with pytest.raises(OutcomeUnknown):
            await provider.submit(req)
        job = UpstreamJob("abc", JobStatus.PROCESSING)
        with pytest.raises(UpstreamTimeout):
            await provider.poll(job)
        assert time.monotonic() - start < 3.0  # two bounded calls, not 10 s of trickle
    finally:
        await provider.aclose()
