"""Breaker state machine and the router's strategies (no network needed)."""

from __future__ import annotations

import random

import pytest

from providers.base import ErrorKind, GenerationRequest, Provider
from providers.registry import build_provider
from proxy.routing import Router, RoutingSettings
from proxy.routing.breaker import BreakerSettings, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**kw: float) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(BreakerSettings(**kw), clock), clock


def test_opens_after_consecutive_failures_then_half_opens_after_cooldown() -> None:
    b, clock = breaker(failure_threshold=3, cooldown_s=10, half_open_probes=1)
    for _ in range(2):
        ticket = b.allow()
        assert ticket is not None
        b.on_failure(ticket)
    assert b.state is BreakerState.CLOSED
    b.on_failure(b.allow())
    assert b.state is BreakerState.OPEN and b.allow() is None
    assert b.retry_in() == pytest.approx(10)
    clock.now += 9.9
    assert b.allow() is None
    clock.now += 0.2
    assert b.state is BreakerState.HALF_OPEN
    probe = b.allow()  # the one probe
    assert probe is not None
    assert b.allow() is None  # bounded
    b.on_success(probe)
    assert b.state is BreakerState.CLOSED
    assert b.allow() is not None and b.allow() is not None


def test_a_bursts_fast_failures_do_not_open_it_while_its_successes_run() -> None:
    # 20 requests start together; 5 fail at once (5xx), 15 are still generating.
    b, clock = breaker(failure_threshold=5)
    tickets = [b.allow() for _ in range(20)]
    clock.now += 0.01
    for ticket in tickets[:5]:
        b.on_failure(ticket)
    assert b.state is BreakerState.CLOSED  # earlier-started requests are in flight
    clock.now += 1
    for ticket in tickets[5:]:
        b.on_success(ticket)
    assert b.state is BreakerState.CLOSED and b.consecutive_failures == 0
    # A real outage: the in-flight requests fail too, and then it opens.
    tickets = [b.allow() for _ in range(6)]
    for ticket in tickets:
        b.on_failure(ticket)
    assert b.state is BreakerState.OPEN


def test_failed_probe_reopens_and_neutral_outcome_frees_the_slot() -> None:
    b, clock = breaker(failure_threshold=1, cooldown_s=5, half_open_probes=1)
    b.on_failure(b.allow())
    clock.now += 5
    probe = b.allow()
    assert probe is not None
    b.on_neutral(probe)  # e.g. the client canceled: says nothing of health
    probe = b.allow()
    assert probe is not None
    b.on_failure(probe)
    assert b.state is BreakerState.OPEN and b.retry_in() == pytest.approx(5)


def test_success_resets_the_consecutive_count() -> None:
    b, _ = breaker(failure_threshold=3, min_calls=1000)  # error rate out of the picture
    for _ in range(10):
        b.on_failure(b.allow())
        b.on_failure(b.allow())
        b.on_success(b.allow())
    assert b.state is BreakerState.CLOSED


def test_opens_on_error_rate_over_the_window_and_forgets_old_calls() -> None:
    b, clock = breaker(failure_threshold=100, error_rate_threshold=0.5, min_calls=10,
                       window_s=60)
    for _ in range(4):
        b.on_failure(b.allow())
        b.on_success(b.allow())
    clock.now += 61  # those 8 calls leave the window
    assert b.error_rate() == 0.0
    for _ in range(5):
        b.on_success(b.allow())
        b.on_failure(b.allow())
    assert b.state is BreakerState.OPEN


# --------------------------------------------------------------------------- router


def providers(ws_price: int = 12_000) -> dict[str, Provider]:
    return {
        "vibedream": build_provider("vibedream", "vibedream",
                                    {"api_key": "k", "base_url": "http://127.0.0.1:1"}),
        "wavespeed": build_provider("wavespeed", "wavespeed",
                                    {"api_key": "k", "base_url": "http://127.0.0.1:2",
                                     "price_micro_usd_per_image": ws_price}),
    }


def router(strategy: str = "priority", ws_price: int = 12_000,
           breaker: dict[str, float] | None = None, **route: object) -> Router:
    settings = RoutingSettings(order=["vibedream", "wavespeed"], breaker=breaker or {},
                               routes={"flux-dev": {"strategy": strategy, **route}})
    return Router(providers(ws_price), settings, rng=random.Random(7))


REQ = GenerationRequest(prompt="p", seed=1, width=1024, height=1024)


def names(plan_providers: list[Provider]) -> list[str]:
    return [p.name for p in plan_providers]


def test_priority_keeps_the_chain_order() -> None:
    assert names(router().plan(REQ).providers) == ["vibedream", "wavespeed"]


def test_cheapest_picks_the_lowest_expected_cost() -> None:
    # VibeDream: 2 cents/image = 20,000 micro-USD; WaveSpeed: 12,000.
    assert names(router("cheapest").plan(REQ).providers) == ["wavespeed", "vibedream"]
    assert names(router("cheapest", ws_price=30_000).plan(REQ).providers) == [
        "vibedream", "wavespeed"]


def test_fastest_follows_the_latency_ewma_and_measures_unknowns_first() -> None:
    r = router("fastest")
    r.record("vibedream", ok=True, latency_s=2.0)
    assert names(r.plan(REQ).providers)[0] == "wavespeed"  # no sample yet
    r.record("wavespeed", ok=True, latency_s=5.0)
    assert names(r.plan(REQ).providers) == ["vibedream", "wavespeed"]
    for _ in range(20):
        r.record("wavespeed", ok=True, latency_s=0.5)
    assert names(r.plan(REQ).providers) == ["wavespeed", "vibedream"]


def test_weighted_shares_follow_the_weights() -> None:
    r = router("weighted", weights={"wavespeed": 3, "vibedream": 1})
    firsts = [r.plan(REQ).providers[0].name for _ in range(4000)]
    share = firsts.count("wavespeed") / len(firsts)
    assert 0.71 < share < 0.79
    r0 = router("weighted", weights={"wavespeed": 0, "vibedream": 1})
    assert {r0.plan(REQ).providers[0].name for _ in range(200)} == {"vibedream"}


def test_requested_providers_replace_the_chain_and_keep_their_order() -> None:
    r = router("cheapest")
    assert names(r.plan(REQ, requested=["vibedream"]).providers) == ["vibedream"]
    assert names(r.plan(REQ, requested=["vibedream", "wavespeed"]).providers) == [
        "vibedream", "wavespeed"]
    plan = r.plan(REQ, requested=["nope"])
    assert plan.providers == [] and "nope" in plan.excluded


def test_capabilities_filter_first_and_say_why() -> None:
    big = REQ.with_(width=1536, height=1536)
    plan = router().plan(big)
    assert names(plan.providers) == ["wavespeed"]
    assert "1536*1536" in plan.excluded["vibedream"]


def test_health_gates_acquire_rate_limits_and_breakers() -> None:
    r = router(breaker={"failure_threshold": 2, "cooldown_s": 60})
    r.record("vibedream", ok=False, kind=ErrorKind.RATE_LIMITED, retry_after_s=30)
    assert r.acquire("vibedream") is None and 29 < r.available_in("vibedream") <= 30
    first = r.acquire("wavespeed")
    assert first is not None
    first.settle(ok=False, kind=ErrorKind.UNAVAILABLE)
    second = r.acquire("wavespeed")
    assert second is not None
    second.settle(ok=False, kind=ErrorKind.TIMEOUT)
    second.settle(ok=False, kind=ErrorKind.TIMEOUT)  # a second settle changes nothing
    assert r.acquire("wavespeed") is None
    assert r.snapshot()["wavespeed"]["state"] == "open"
    # Policy refusals are the request's fault, not the provider's.
    for _ in range(5):
        r.record("vibedream", ok=False, kind=ErrorKind.POLICY)
    assert r.snapshot()["vibedream"]["state"] == "closed"


def test_hedge_delay_uses_static_delay_until_enough_samples() -> None:
    assert router().hedge_delay("flux-dev", "wavespeed") is None  # off by default
    r = router(hedge=True, hedge_delay_s=3.0, hedge_min_samples=5, hedge_percentile=90)
    assert r.hedge_delay("flux-dev", "wavespeed") == 3.0
    for latency in (1.0, 1.0, 1.0, 1.0, 2.0):
        r.record("wavespeed", ok=True, latency_s=latency)
    assert r.hedge_delay("flux-dev", "wavespeed") == 2.0
