"""What /metrics says is true from the first request: known series exist at zero,
and the new counters (wasted cost, NSFW images, retries, queue wait, budgets) move
exactly when the thing they count happens."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from providers.simulators import SimulatorServer
from proxy import metrics
from proxy.metrics import REGISTRY

from .conftest import make_settings, running_proxy, wait_terminal

ADMIN = "metrics-admin-key"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_known_series_are_exported_at_zero_before_any_request(
    tmp_path: Path, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer
) -> None:
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim, "vibedream": vibedream_sim})
    async with running_proxy(settings) as c:
        page = samples((await c.get("/metrics")).text)
    # A failure, a failover, a refusal-like outcome: each has a series before it happens,
    # so rate() counts the first one (a series born at 1 is missed).
    expected = [
        ("flux_proxy_predictions_total", {"model": "flux-dev", "provider": "wavespeed",
                                          "status": "failed", "surface": "openai"}),
        ("flux_proxy_predictions_accepted_total", {"model": "flux-dev", "surface": "vibedream"}),
        ("flux_proxy_attempts_total", {"provider": "vibedream", "outcome": "policy_refusal"}),
        ("flux_proxy_failovers_total", {"from": "wavespeed", "to": "vibedream",
                                        "reason": "unavailable"}),
        ("flux_proxy_retries_total", {"provider": "wavespeed", "reason": "rate_limited"}),
        ("flux_proxy_wasted_cost_usd_total", {"provider": "vibedream", "reason": "hedge_lost"}),
        ("flux_proxy_hedge_results_total", {"provider": "wavespeed", "result": "won"}),
        ("flux_proxy_nsfw_images_total", {"provider": "wavespeed"}),
        ("flux_proxy_upstream_request_duration_seconds_count",
         {"provider": "vibedream", "operation": "poll", "outcome": "timeout"}),
        ("flux_proxy_queue_wait_seconds_count", {"model": "flux-dev"}),
    ]
    for name, labels in expected:
        assert (name, frozenset(labels.items())) in page, (name, labels)


async def test_wasted_cost_nsfw_and_queue_wait_count_what_happened(
    tmp_path: Path, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer
) -> None:
    # VibeDream bills failed jobs (2 cents an image); the prediction then fails over to
    # WaveSpeed, which flags the image NSFW.
    vibedream_sim.config.fail_after_accept = True
    wavespeed_sim.config.nsfw = True
    settings = make_settings(tmp_path, {"vibedream": vibedream_sim, "wavespeed": wavespeed_sim})
    before_waste = value("flux_proxy_wasted_cost_usd_total", provider="vibedream",
                         reason="failed_billed")
    before_lost = value("flux_proxy_wasted_cost_usd_total", provider="wavespeed",
                        reason="hedge_lost")
    before_nsfw = value("flux_proxy_nsfw_images_total", provider="wavespeed")
    before_wait = value("flux_proxy_queue_wait_seconds_count", model="flux-dev")
    before_failover = value("flux_proxy_failovers_total", **{
        "from": "vibedream", "to": "wavespeed", "reason": "unavailable"})
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={"prompt": "a lighthouse", "size": "512*512"})
        done = await wait_terminal(c, r.json()["id"])
    assert done["status"] == "completed" and done["provider"] == "wavespeed"
    assert done["has_nsfw_contents"] == [True]
    failed = done["attempts"][0]
    assert failed["provider"] == "vibedream" and failed["cost_micro_usd"] == 20_000
    # Exactly the failed attempt's cost, once; the delivered one is not waste.
    assert value("flux_proxy_wasted_cost_usd_total", provider="vibedream",
                 reason="failed_billed") - before_waste == pytest.approx(0.02)
    assert value("flux_proxy_wasted_cost_usd_total", provider="wavespeed",
                 reason="hedge_lost") == before_lost
    assert value("flux_proxy_nsfw_images_total", provider="wavespeed") - before_nsfw == 1
    assert value("flux_proxy_queue_wait_seconds_count", model="flux-dev") - before_wait == 1
    assert value("flux_proxy_failovers_total", **{
        "from": "vibedream", "to": "wavespeed", "reason": "unavailable"}) - before_failover == 1


async def test_budget_gauges_are_exported_from_the_start(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, auth_enabled=True,
                             admin_key=ADMIN)
    async with running_proxy(settings) as c:
        r = await c.post("/admin/keys", json={"name": "gauged", "budget_usd": "2.5"},
                         headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text
        # At creation: the whole budget is left.
        assert value("flux_proxy_budget_usd", key_name="gauged") == 2.5
        assert value("flux_proxy_budget_remaining_usd", key_name="gauged") == 2.5
        # Its cost series exists before its first spend (rate() counts that one too).
        assert REGISTRY.get_sample_value("flux_proxy_cost_usd_total", {
            "provider": "wavespeed", "model": "flux-dev", "key_name": "gauged"}) == 0
        key = {"Authorization": f"Bearer {r.json()['key']}"}
        done = await c.post("/v1/predictions", headers=key, json={
            "prompt": "a lighthouse", "size": "512*512", "enable_sync_mode": True})
        assert done.json()["cost_usd"] == "0.012000"
    # The registry outlives the app in this process: forget the gauges, as a restart would.
    metrics.BUDGET_USD.remove("gauged")
    metrics.BUDGET_REMAINING_USD.remove("gauged")
    # A restart publishes every budgeted key before any request: 2.5 - 0.012 left.
    async with running_proxy(settings) as c:
        assert value("flux_proxy_budget_usd", key_name="gauged") == 2.5
        assert abs(value("flux_proxy_budget_remaining_usd", key_name="gauged") - 2.488) < 1e-9
