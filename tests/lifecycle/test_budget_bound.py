"""Budgets hold across replicas and restarts, with the bound the README states:
a key overshoots its budget by at most what attempts already submitted cost
above what they held (sum of max(0, cost - reserved_micro_usd))."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from providers.base import ErrorKind
from providers.testing import Accept, Fail, ScriptedProvider
from proxy.accounts.auth import Principal
from proxy.accounts.budgets import BudgetExceeded
from proxy.lifecycle.service import PredictionService
from proxy.routing import Router, RoutingSettings
from proxy.store import Store
from proxy.store.models import ApiKey, Attempt, Reservation

from .conftest import Harness, LoopTimeStore, request

pytestmark = pytest.mark.looptime
BUDGET = 600_000


def replica(url: str, name: str, providers: list[ScriptedProvider], harness: Harness
            ) -> tuple[PredictionService, Store]:
    store = Store(url)
    router = Router({p.name: p for p in providers},
                    RoutingSettings(order=[p.name for p in providers]), clock=harness.clock)
    service = PredictionService(LoopTimeStore(store), router,  # type: ignore[arg-type]
                                instance_id=name, clock=harness.clock)
    return service, store


async def test_fifty_concurrent_on_two_replicas_with_a_restart_stay_within_the_bound(
        harness: Harness) -> None:
    # a quotes 30,000 per image against a 20,000 list price, then fails after
    # accepting (billed); b serves the failover at 12,000.
    a = ScriptedProvider("a", [Accept(polls=2, then=Fail(ErrorKind.UNAVAILABLE),
                                      charged_micro_usd=30_000)] * 60, price_micro_usd=20_000)
    b = ScriptedProvider("b", [Accept(polls=1)] * 60, price_micro_usd=12_000)
    url = str(harness.store.inner.engine.url)  # type: ignore[attr-defined]
    key = await harness.store.create_key(ApiKey(
        id="key-1", name="team", key_hash="h" * 64, prefix="fp_test",
        budget_micro_usd=BUDGET, budget_period="month"))
    one, one_store = replica(url, "replica-1", [a, b], harness)
    two, two_store = replica(url, "replica-2", [a, b], harness)
    await two.start()

    async def submit(service: PredictionService) -> str | None:
        try:
            return (await service.submit(request(), Principal(key=key))).pred.id
        except BudgetExceeded:
            return None

    accepted = await asyncio.gather(*(submit(one if i % 2 else two) for i in range(50)))
    # Restart replica-1 in the middle (SIGKILL: no shutdown writes), same instance id.
    await asyncio.sleep(1.5)
    tasks = [r.task for r in one._runs.values() if r.task]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await one_store.dispose()
    again, again_store = replica(url, "replica-1", [a, b], harness)
    await again.start()

    ids = [i for i in accepted if i is not None]
    for _ in range(600):
        rows = [await harness.store.get_prediction(i) for i in ids]
        if all(r is not None and r.status in ("completed", "failed") for r in rows):
            break
        await asyncio.sleep(1)
    async with harness.store.inner._sessions() as session:  # type: ignore[attr-defined]
        attempts = list(await session.scalars(select(Attempt)))
        holds = list(await session.scalars(select(Reservation)))
    spent = sum(x.cost_micro_usd for x in attempts)
    bound = sum(max(0, x.cost_micro_usd - x.reserved_micro_usd) for x in attempts)
    assert 0 < len(ids) < 50  # the budget was binding
    assert spent <= BUDGET + bound, (spent, bound)
    # Upstream billed exactly what the ledger says; nothing is held any more.
    assert spent == sum(a.billed.values()) + sum(b.billed.values())
    assert holds == []
    # A replica that has seen a's quote expects that price for its next submits.
    assert two.router.expected_cost(a, request().to_generation(7)) == 30_000
    for service in (two, again):
        await service.stop()
    await two_store.dispose()
    await again_store.dispose()
