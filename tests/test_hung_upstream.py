"""A hung upstream (accepts the connection, reads the request, never answers)
costs a sync client at most `submit_timeout_s` before the next provider is tried;
the lost submit is recorded outcome-unknown, at its expected price (it may have
been accepted and billed). And WaveSpeed, by default, submits asynchronously and
is polled, so its submit never holds the connection open while the image is made.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from providers.base import GenerationRequest, OutcomeUnknown
from providers.registry import build_provider
from providers.simulators import SimulatorServer
from proxy.config import Settings

from .conftest import provider_table, running_proxy

SUBMIT_TIMEOUT_S = 0.5
BODY = {"prompt": "a lighthouse", "size": "512*512", "enable_sync_mode": True}
# What the lost submit may have cost: VibeDream's 2 cents, WaveSpeed's list price.
EXPECTED_PRICE = {"vibedream": 20_000, "wavespeed": 12_000}


@dataclass
class Silent:
    """A loopback upstream that reads whatever comes and never writes a byte."""

    base_url: str = ""
    received: list[bytes] = field(default_factory=list)
    connections: int = 0


@pytest.fixture
def silent() -> Iterator[Silent]:
    """The silent upstream on its own event loop, in a thread: the in-process test
    client blocks the test's loop while the proxy handles a request."""
    state = Silent()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            async with asyncio.timeout(30):  # bounded: the client leaves long before
                while chunk := await reader.read(65536):
                    state.received.append(chunk)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        state.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        ready.set()
        async with server:
            await stop.wait()
            server.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(5), "the silent upstream did not start"
    try:
        yield state
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def hung_table(silent: Silent) -> dict[str, Any]:
    # Only submit_timeout_s may end the wait: the read timeout (shortened from 30 s,
    # so that a regression fails in seconds) and total_timeout_s (60 s) are longer.
    return {"base_url": silent.base_url, "api_key": "k", "submit_timeout_s": SUBMIT_TIMEOUT_S,
            "read_timeout_s": 3.0}


@pytest.mark.parametrize(("hung", "healthy"), [("vibedream", "wavespeed"),
                                               ("wavespeed", "vibedream")])
async def test_a_hung_submit_fails_over_within_submit_timeout(
    tmp_path: Path, silent: Silent, vibedream_sim: SimulatorServer,
    wavespeed_sim: SimulatorServer, hung: str, healthy: str,
) -> None:
    sim = vibedream_sim if healthy == "vibedream" else wavespeed_sim
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'proxy.db'}",
        providers={hung: hung_table(silent), healthy: provider_table(sim)},
        routing={"order": [hung, healthy]},
        public_base_url="http://proxy.test",
        instance_id="test-instance",
        auth_enabled=False,
    )
    async with running_proxy(settings) as c:
        start = time.monotonic()
        r = await c.post("/v1/predictions", json=BODY)
        elapsed = time.monotonic() - start
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed" and body["provider"] == healthy
    lost, served = body["attempts"]
    assert lost["provider"] == hung and lost["status"] == "unknown"
    assert lost["error_kind"] == "outcome_unknown" and lost["upstream_id"] is None
    assert "may exist upstream" in lost["error"]
    # It may have been accepted and billed: counted at its expected price.
    assert lost["cost_micro_usd"] == EXPECTED_PRICE[hung]
    assert served["provider"] == healthy and served["status"] == "completed"
    assert body["cost_micro_usd"] == lost["cost_micro_usd"] + served["cost_micro_usd"]
    # The whole request reached the hung upstream (so its outcome is truly unknown),
    # once: it is never submitted there again.
    sent = b"".join(silent.received)
    assert sent.count(b"POST ") == 1 and b'"prompt":"a lighthouse"' in sent
    assert silent.connections == 1
    # submit_timeout_s, not read_timeout_s nor sync_read_timeout_s (100 s).
    assert SUBMIT_TIMEOUT_S * 0.9 <= lost["latency_ms"] / 1000 < SUBMIT_TIMEOUT_S + 1.0
    assert elapsed < SUBMIT_TIMEOUT_S + 3.0


@pytest.fixture
async def dribbler() -> AsyncIterator[str]:
    """Answers a submit one header byte every 0.05 s: no read ever waits long, so a
    read timeout alone never fires; only the bound on the whole answer does."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 200:  # bounded: 10 s
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        server.close()


@pytest.mark.parametrize("kind", ["vibedream", "wavespeed"])
async def test_submit_timeout_bounds_the_whole_answer(dribbler: str, kind: str) -> None:
    provider = build_provider(kind, kind, {"base_url": dribbler, "api_key": "k",
                                           "submit_timeout_s": SUBMIT_TIMEOUT_S})
    try:
        start = time.monotonic()
        with pytest.raises(OutcomeUnknown, match=r"within 0\.5s of sending"):
            await provider.submit(GenerationRequest(prompt="p", seed=1, enable_sync_mode=True))
        assert time.monotonic() - start < SUBMIT_TIMEOUT_S + 1.0
    finally:
        await provider.aclose()


# --------------------------------------------------------------------------- WaveSpeed


def ws_settings(tmp_path: Path, sim: SimulatorServer, **extra: Any) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'proxy.db'}",
        providers={"wavespeed": provider_table(sim, **extra)},
        routing={"order": ["wavespeed"]},
        public_base_url="http://proxy.test",
        instance_id="test-instance",
        auth_enabled=False,
    )


async def test_wavespeed_sync_is_emulated_by_default(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    async with running_proxy(ws_settings(tmp_path, wavespeed_sim)) as c:
        r = await c.post("/v1/predictions", json=BODY | {"prompt": "[sim:latency=0.3] a fox"})
        b64 = await c.post("/v1/predictions", json=BODY | {"enable_base64_output": True,
                                                          "output_format": "png"})
        models = (await c.get("/v1/models")).json()["data"][0]["providers"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed" and len(body["outputs"]) == 1
    assert body["outputs"][0].startswith(wavespeed_sim.base_url)
    # Upstream, both submits were asynchronous (the POST answered at once) and polled.
    tasks = wavespeed_sim.billing["tasks"]
    assert [t["sync"] for t in tasks] == [False, False]
    assert wavespeed_sim.stats["submits"] == 2 and wavespeed_sim.stats["polls"] >= 2
    # Base64 comes with the polled result (WaveSpeed encodes it; the proxy labels it).
    assert b64.status_code == 200, b64.text
    assert b64.json()["outputs"][0].startswith("data:image/png;base64,")
    [ws] = [p for p in models if p["name"] == "wavespeed"]
    assert ws["capabilities"]["native_sync"] is False


async def test_wavespeed_native_sync_stays_available_by_setting(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    settings = ws_settings(tmp_path, wavespeed_sim, use_native_sync=True)
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json=BODY)
    assert r.status_code == 200 and r.json()["status"] == "completed"
    assert [t["sync"] for t in wavespeed_sim.billing["tasks"]] == [True]
    assert wavespeed_sim.stats["polls"] == 0  # one round trip
