"""Failover, breakers, rate limits, deadlines and hedging, against simulators on loopback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import REGISTRY

from providers.simulators import SimulatorServer

from .conftest import make_settings, running_proxy, wait_for, wait_terminal

BODY = {"prompt": "a lighthouse", "size": "512*512", "enable_sync_mode": True}


def failovers(src: str, dst: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "flux_proxy_failovers_total", {"from": src, "to": dst, "reason": reason})
    return value or 0.0


@pytest.fixture
def ws_then_vd(tmp_path: Path, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer):
    def make(**overrides: Any) -> Any:
        return make_settings(tmp_path, {"wavespeed": wavespeed_sim, "vibedream": vibedream_sim},
                             **overrides)
    return make


async def test_provider_down_all_complete_on_the_other_and_the_breaker_opens(
    ws_then_vd: Any, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.error_rate = 1.0
    before = failovers("wavespeed", "vibedream", "unavailable")
    settings = ws_then_vd(routing={"order": ["wavespeed", "vibedream"],
                                   "breaker": {"failure_threshold": 3, "cooldown_s": 60}})
    async with running_proxy(settings) as c:
        for _ in range(10):
            body = (await c.post("/v1/predictions", json=BODY)).json()
            assert body["status"] == "completed" and body["provider"] == "vibedream"
        # After 3 failures the breaker is open: WaveSpeed gets no more traffic.
        assert wavespeed_sim.stats["submits"] == 3
        assert vibedream_sim.stats["submits"] == 10
        models = (await c.get("/v1/models")).json()["data"][0]["providers"]
        health = {p["name"]: p["health"] for p in models}
        assert health["wavespeed"]["state"] == "open"
        assert health["vibedream"]["state"] == "closed"
        assert (await c.get("/readyz")).json()["breakers"]["wavespeed"] == "open"
        text = (await c.get("/metrics")).text
        assert 'flux_proxy_breaker_state{provider="wavespeed"} 2.0' in text
    assert failovers("wavespeed", "vibedream", "unavailable") - before == 3


async def test_breaker_half_opens_after_cooldown_and_closes_on_success(
    ws_then_vd: Any, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.error_rate = 1.0
    settings = ws_then_vd(routing={"order": ["wavespeed", "vibedream"],
                                   "breaker": {"failure_threshold": 2, "cooldown_s": 0.4}})
    async with running_proxy(settings) as c:
        for _ in range(3):
            await c.post("/v1/predictions", json=BODY)
        assert wavespeed_sim.stats["submits"] == 2
        wavespeed_sim.config.error_rate = 0.0  # it recovers
        await anyio.sleep(0.5)
        body = (await c.post("/v1/predictions", json=BODY)).json()
        assert body["provider"] == "wavespeed"  # the half-open probe went through
        assert wavespeed_sim.stats["submits"] == 3
        models = (await c.get("/v1/models")).json()["data"][0]["providers"]
        assert {p["name"]: p["health"] for p in models}["wavespeed"]["state"] == "closed"


async def test_rate_limited_provider_is_skipped_until_retry_after_then_used_again(
    ws_then_vd: Any, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.rate_limit = 1.0
    wavespeed_sim.config.retry_after_s = 3.0  # roomy: the first request must end within it
    async with running_proxy(ws_then_vd()) as c:
        first = (await c.post("/v1/predictions", json=BODY)).json()
        assert first["provider"] == "vibedream"
        assert first["attempts"][0]["error_kind"] == "rate_limited"
        second = (await c.post("/v1/predictions", json=BODY)).json()
        assert [a["provider"] for a in second["attempts"]] == ["vibedream"]  # traffic moved
        assert wavespeed_sim.stats["submits"] == 1
        wavespeed_sim.config.rate_limit = 0.0
        await anyio.sleep(3.05)
        third = (await c.post("/v1/predictions", json=BODY)).json()
        assert third["provider"] == "wavespeed"  # and came back


async def test_only_provider_rate_limited_waits_retry_after_and_retries_it(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.rate_limit = 1.0
    wavespeed_sim.config.retry_after_s = 0.4
    async with running_proxy(make_settings(tmp_path, {"wavespeed": wavespeed_sim})) as c:
        r = await c.post("/v1/predictions", json={**BODY, "enable_sync_mode": False})
        pred_id = r.json()["id"]
        # The attempt row exists before its POST: wait for the 429 itself.
        await wait_for(c, pred_id, lambda b: b["attempts"]
                       and b["attempts"][0]["error_kind"] == "rate_limited")
        wavespeed_sim.config.rate_limit = 0.0
        start = time.monotonic()
        done = await wait_terminal(c, pred_id)
    assert done["status"] == "completed"
    assert [a["error_kind"] for a in done["attempts"]] == ["rate_limited", None]
    assert time.monotonic() - start < 2.0


async def test_hanging_submit_moves_on_after_the_timeout_without_doubling(
    ws_then_vd: Any, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.hang = True
    settings = ws_then_vd(provider_extra={"wavespeed": {"read_timeout_s": 0.3}})
    async with running_proxy(settings) as c:
        body = (await c.post("/v1/predictions", json={**BODY, "enable_sync_mode": False})).json()
        done = await wait_terminal(c, body["id"])
    assert done["status"] == "completed" and done["provider"] == "vibedream"
    first = done["attempts"][0]
    assert first["status"] == "unknown" and first["error_kind"] == "outcome_unknown"
    assert "cannot be polled or canceled" in first["error"]
    assert wavespeed_sim.stats["submits"] == 1


async def test_dropped_submit_is_never_doubled(
    ws_then_vd: Any, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.drop = True
    async with running_proxy(ws_then_vd()) as c:
        body = (await c.post("/v1/predictions", json=BODY)).json()
    assert body["status"] == "completed" and body["provider"] == "vibedream"
    assert body["attempts"][0]["status"] == "unknown"
    assert body["attempts"][0]["cost_micro_usd"] == 12_000  # may have been billed
    assert wavespeed_sim.stats["submits"] == 1


async def test_job_outliving_its_provider_deadline_fails_over(
    ws_then_vd: Any, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.job_latency_s = 5.0
    settings = ws_then_vd(provider_extra={"wavespeed": {"deadline_s": 0.4,
                                                        "use_native_sync": False}})
    async with running_proxy(settings) as c:
        start = time.monotonic()
        body = (await c.post("/v1/predictions", json=BODY)).json()
        elapsed = time.monotonic() - start
    assert body["status"] == "completed" and body["provider"] == "vibedream"
    assert body["attempts"][0]["error_kind"] == "timeout"
    assert elapsed < 3.0


async def test_total_deadline_bounds_the_prediction(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    vibedream_sim.config.job_latency_s = 5.0
    settings = make_settings(tmp_path, {"vibedream": vibedream_sim}, prediction_deadline_s=0.5)
    async with running_proxy(settings) as c:
        start = time.monotonic()
        body = (await c.post("/v1/predictions", json=BODY)).json()
    assert body["status"] == "failed" and body["error_kind"] == "timeout"
    assert time.monotonic() - start < 3.0


async def test_cheapest_and_fastest_pick_what_they_should(
    ws_then_vd: Any, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer
) -> None:
    # VibeDream first in the chain, but WaveSpeed is cheaper ($0.012 vs 2 cents).
    cheapest = ws_then_vd(routing={"order": ["vibedream", "wavespeed"],
                                   "routes": {"flux-dev": {"strategy": "cheapest"}}})
    async with running_proxy(cheapest) as c:
        assert (await c.post("/v1/predictions", json=BODY)).json()["provider"] == "wavespeed"

    vibedream_sim.config.job_latency_s = 0.4
    wavespeed_sim.config.job_latency_s = 0.02
    fastest = ws_then_vd(routing={"order": ["vibedream", "wavespeed"],
                                  "routes": {"flux-dev": {"strategy": "fastest"}}},
                         database_url=cheapest.database_url)
    async with running_proxy(fastest) as c:
        warmup = [(await c.post("/v1/predictions", json=BODY)).json()["provider"]
                  for _ in range(2)]
        assert sorted(warmup) == ["vibedream", "wavespeed"]  # each gets measured
        picks = [(await c.post("/v1/predictions", json=BODY)).json()["provider"]
                 for _ in range(3)]
    assert picks == ["wavespeed"] * 3


async def test_request_can_pin_providers(ws_then_vd: Any, wavespeed_sim: SimulatorServer) -> None:
    async with running_proxy(ws_then_vd()) as c:
        body = (await c.post("/v1/predictions", json={**BODY, "providers": ["vibedream"]})).json()
        assert body["provider"] == "vibedream" and wavespeed_sim.stats["submits"] == 0
        bad = await c.post("/v1/predictions", json={**BODY, "providers": ["martian"]})
        assert bad.status_code == 422
        assert bad.json()["error"]["details"][0]["field"] == "providers"
        # Pinned to a provider that cannot serve the size: 422 with the reason.
        big = await c.post("/v1/predictions", json={**BODY, "size": "1536*1536",
                                                     "providers": ["vibedream"]})
        assert big.status_code == 422 and big.json()["error"]["code"] == "unsupported"
        # Pinned with no fallback: a failure is not rerouted elsewhere.
        wavespeed_sim.config.error_rate = 1.0
        body = (await c.post("/v1/predictions", json={**BODY, "providers": ["wavespeed"]})).json()
        assert body["status"] == "failed" and len(body["attempts"]) == 1


async def test_hedging_takes_the_first_result_and_records_both_costs(
    ws_then_vd: Any, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.job_latency_s = 2.0
    settings = ws_then_vd(routing={"order": ["wavespeed", "vibedream"], "routes": {
        "flux-dev": {"hedge": True, "hedge_delay_s": 0.2}}})
    async with running_proxy(settings) as c:
        start = time.monotonic()
        body = (await c.post("/v1/predictions", json=BODY)).json()
        elapsed = time.monotonic() - start
        assert body["status"] == "completed" and body["provider"] == "vibedream"
        assert elapsed < 1.5  # the client does not wait for the slow one
        # The loser (inside WaveSpeed's sync submit) settles in the background.
        body = await wait_for(c, body["id"], lambda b: all(
            a["completed_at"] for a in b["attempts"]) and b["cost_micro_usd"] == 32_000)
    by_provider = {a["provider"]: a for a in body["attempts"]}
    # The loser was told to stop; WaveSpeed's sync submit still ran to the end upstream.
    assert by_provider["wavespeed"]["status"] in ("canceled", "completed")
    assert body["outputs"][0].startswith(vibedream_sim.base_url)
    # WaveSpeed cannot cancel: the job runs on and is billed; both costs count.
    assert by_provider["wavespeed"]["cost_micro_usd"] == 12_000
    assert by_provider["vibedream"]["cost_micro_usd"] == 20_000
    assert body["cost_micro_usd"] == 32_000


async def test_hedge_loser_that_is_polling_is_canceled(
    ws_then_vd: Any, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.job_latency_s = 3.0
    settings = ws_then_vd(
        routing={"order": ["wavespeed", "vibedream"],
                 "routes": {"flux-dev": {"hedge": True, "hedge_delay_s": 0.2}}},
        provider_extra={"wavespeed": {"use_native_sync": False}},
    )
    async with running_proxy(settings) as c:
        body = (await c.post("/v1/predictions", json=BODY)).json()
        assert body["provider"] == "vibedream"
        body = await wait_for(c, body["id"], lambda b: all(
            a["completed_at"] for a in b["attempts"]) and b["cost_micro_usd"] == 32_000)
    loser = next(a for a in body["attempts"] if a["provider"] == "wavespeed")
    assert loser["status"] == "canceled" and "hedge lost" in loser["error"]
    assert body["cost_micro_usd"] == 32_000
