"""Hedging: a slow first attempt gets a backup after the hedge delay; the first
result wins, the loser is canceled where its upstream allows, and both costs
stay on the prediction."""

from __future__ import annotations

import asyncio

import pytest

from providers.base import ErrorKind
from providers.testing import Accept, Fail, Raise, ScriptedProvider

from .conftest import Harness, finished, request

pytestmark = pytest.mark.looptime
HEDGE = {"routes": {"flux-dev": {"hedge": True, "hedge_delay_s": 10.0}}}


async def settled(harness: Harness, prediction_id: str, cost: int) -> None:
    """The loser settles after the client has its answer: wait for its cost."""
    for _ in range(200):
        pred, _ = await harness.rows(prediction_id)
        if pred.cost_micro_usd == cost:
            return
        await asyncio.sleep(1)
    raise AssertionError(f"cost stayed {pred.cost_micro_usd}, expected {cost}")


async def test_no_hedge_when_the_first_answers_within_the_delay(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=5)])  # ~6 s at one poll a second
    b = ScriptedProvider("b")
    service = harness.service(a, b, **HEDGE)
    run = await finished(service, await service.submit(request()))
    assert run.pred.provider == "a" and b.calls == []


async def test_backup_wins_and_the_slow_loser_is_canceled_and_billed(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=100)], price_micro_usd=20_000)
    b = ScriptedProvider("b", [Accept(polls=2)], price_micro_usd=12_000)
    service = harness.service(a, b, **HEDGE)
    run = await finished(service, await service.submit(request()))
    assert run.pred.status == "completed" and run.pred.provider == "b"
    await settled(harness, run.pred.id, 32_000)
    pred, attempts = await harness.rows(run.pred.id)
    assert {(x.provider, x.status, x.cost_micro_usd) for x in attempts} == {
        ("a", "canceled", 20_000), ("b", "completed", 12_000)}
    assert ("cancel", "a-1") in a.calls
    assert "hedge lost" in next(x.error for x in attempts if x.provider == "a")
    started = {x.provider: x.created_at for x in attempts}
    assert 10 <= (started["b"] - started["a"]).total_seconds() < 11
    assert pred.cost_micro_usd == sum(a.billed.values()) + sum(b.billed.values())


async def test_first_still_wins_when_the_backup_is_slower(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=15)])
    b = ScriptedProvider("b", [Accept(polls=100)])
    service = harness.service(a, b, **HEDGE)
    run = await finished(service, await service.submit(request()))
    assert run.pred.provider == "a"
    await settled(harness, run.pred.id, 20_000)
    _, attempts = await harness.rows(run.pred.id)
    assert [(x.provider, x.status) for x in attempts] == [("a", "completed"), ("b", "canceled")]


async def test_a_failed_first_leaves_the_backup_to_finish(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=12, then=Fail(ErrorKind.UNAVAILABLE))])
    b = ScriptedProvider("b", [Accept(polls=5)])
    service = harness.service(a, b, **HEDGE)
    run = await finished(service, await service.submit(request()))
    assert run.pred.status == "completed" and run.pred.provider == "b"
    assert a.submits == 1 and b.submits == 1


async def test_no_backup_when_its_breaker_is_open(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=15)])
    b = ScriptedProvider("b", [Raise(ErrorKind.UNAVAILABLE)] * 5)
    service = harness.service(a, b, breaker={"failure_threshold": 1, "cooldown_s": 600}, **HEDGE)
    b_only = await finished(service, await service.submit(request(providers=["b"])))
    assert b_only.pred.status == "failed"
    run = await finished(service, await service.submit(request()))
    assert run.pred.provider == "a" and b.submits == 1
