"""Budgets on the lifecycle: a request is refused before anything is written when
the key's spend plus what is reserved plus this request's expected price would
pass its budget; the reservation is held while the prediction runs and released
when it ends, whichever way it ends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from providers.base import ErrorKind
from providers.testing import Accept, Raise, ScriptedProvider
from proxy.accounts.auth import Principal
from proxy.accounts.budgets import BudgetExceeded
from proxy.store.models import ApiKey

from .conftest import Harness, finished, request

pytestmark = pytest.mark.looptime


async def a_key(harness: Harness, budget: int) -> ApiKey:
    return await harness.store.create_key(ApiKey(
        id="key-1", name="team", key_hash="h" * 64, prefix="fp_test",
        budget_micro_usd=budget, budget_period="month"))


async def test_reserved_while_running_released_at_the_end(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=10)], price_micro_usd=20_000)
    b = ScriptedProvider("b", price_micro_usd=30_000)
    service = harness.service(a, b)
    key = await a_key(harness, 100_000)
    run = await service.submit(request(), Principal(key=key))
    # Admitted with its first attempt's row (one transaction): a's own price is held.
    assert await service.budgets.reserved(key) == 20_000
    await asyncio.sleep(0.5)
    assert await service.budgets.reserved(key) == 20_000
    await finished(service, run)
    assert await service.budgets.reserved(key) == 0
    assert await harness.store.spent_since(key.id, run.pred.created_at.replace(day=1)) == 20_000


async def test_admission_checks_the_dearest_candidate(harness: Harness) -> None:
    # Failover may land on any candidate: admission refuses what the dearest would
    # take past the budget, even when the first choice alone would fit.
    a = ScriptedProvider("a", [Accept(polls=1)], price_micro_usd=20_000)
    b = ScriptedProvider("b", price_micro_usd=30_000)
    service = harness.service(a, b)
    key = await a_key(harness, 25_000)
    with pytest.raises(BudgetExceeded):
        await service.submit(request(), Principal(key=key))
    assert a.submits == 0 and await service.budgets.reserved(key) == 0
    assert (await harness.store.list_predictions(api_key_id=key.id))[0] == []


async def test_a_request_past_the_budget_is_refused_before_anything_is_written(
        harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=100)] * 3, price_micro_usd=40_000)
    service = harness.service(a)
    key = await a_key(harness, 100_000)
    first = await service.submit(request(), Principal(key=key))
    second = await service.submit(request(), Principal(key=key))
    with pytest.raises(BudgetExceeded, match="budget of key 'team'"):
        await service.submit(request(), Principal(key=key))  # 40k + 40k + 40k > 100k
    rows, _ = await harness.store.list_predictions(api_key_id=key.id)
    assert {p.id for p in rows} == {first.pred.id, second.pred.id}
    assert a.submits <= 2
    for run in (first, second):
        await finished(service, run)


async def test_a_failed_prediction_releases_its_reservation(harness: Harness) -> None:
    a = ScriptedProvider("a", [Raise(ErrorKind.POLICY)], price_micro_usd=60_000)
    service = harness.service(a)
    key = await a_key(harness, 100_000)
    run = await finished(service, await service.submit(request(), Principal(key=key)))
    assert run.pred.status == "failed"
    assert await service.budgets.reserved(key) == 0
    again = await service.submit(request(), Principal(key=key))  # nothing was spent
    assert again.pred.id != run.pred.id


async def test_the_sweeper_releases_the_hold_of_an_attempt_orphaned_after_its_end(
        harness: Harness) -> None:
    from datetime import timedelta

    from proxy.store.budget import Hold
    from proxy.store.models import Attempt

    service = harness.service(ScriptedProvider("a"), deadline_s=600)
    key = await a_key(harness, 100_000)
    since = datetime(2000, 1, 1, tzinfo=UTC)
    run = await service.submit(request(), Principal(key=key))  # no script: it fails at once
    await finished(service, run)
    # A hedge loser whose process died: its attempt never settled, its hold stayed.
    loser = Attempt(prediction_id=run.pred.id, seq=9, provider="a", api_key_id=key.id)
    await harness.store.update_prediction(run.pred.id, status="processing")
    assert await harness.store.begin_attempt(loser, Hold(key.id, 100_000, since, 7_000))
    long_ago = datetime.now(UTC) - timedelta(seconds=3600)
    await harness.store.finish_prediction(run.pred.id, status="failed", completed_at=long_ago)
    assert (await harness.store.exposure(key.id, since))[1] == 7_000
    await service.start()
    await asyncio.sleep(service.lease_s)  # one sweep
    assert (await harness.store.exposure(key.id, since))[1] == 0
