"""Crash points: the process dies after each lifecycle write in turn, a fresh
service on the same database resumes, and the user gets what they paid for.

A fault hook in the store raises `SimulatedCrash` (a BaseException, so nothing
in the lifecycle can catch it and write more) right after the Nth committed
write; the crashed service is then dropped without its shutdown writes, as a
SIGKILL would. The scripted providers are shared by both services: they are
"the upstream", so their job lists are the upstream's billing log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import pytest

from providers.base import ErrorKind
from providers.testing import Accept, Fail, ScriptedProvider, scripted_settings
from proxy.lifecycle.service import PredictionService
from proxy.routing import Router, RoutingSettings
from proxy.store import Store

from .conftest import Harness, LoopTimeStore, request

pytestmark = pytest.mark.looptime
PG_URL = os.environ.get("FLUX_PROXY_TEST_PG_URL",
                        "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


FAST = scripted_settings(poll_initial_s=0.01, poll_max_s=0.01)


class SimulatedCrash(BaseException):
    pass


class CrashAfter:
    """The store's after_write hook: dies after write `n`, and stays dead."""

    def __init__(self, n: int) -> None:
        self.n, self.count, self.dead = n, 0, False

    def __call__(self, operation: str) -> None:
        if self.dead:
            raise SimulatedCrash(operation)
        self.count += 1
        if self.count == self.n:
            self.dead = True
            raise SimulatedCrash(f"after write {self.n} ({operation})")


# PostgreSQL runs on real time: asyncpg's own timers misfire under looptime's
# fast-forwarding. Polls are made short below so that costs little.
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.looptime(False))])
async def db_url(request: pytest.FixtureRequest, harness: Harness) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield str(harness.store.inner.engine.url)  # type: ignore[attr-defined]
        return
    if os.environ.get("FLUX_PROXY_SKIP_PG") == "1":
        pytest.skip("FLUX_PROXY_SKIP_PG=1: no PostgreSQL on this machine")
    yield PG_URL


def make_service(store: Store, providers: list[ScriptedProvider], harness: Harness
                 ) -> PredictionService:
    router = Router({p.name: p for p in providers},
                    RoutingSettings(order=[p.name for p in providers]), clock=harness.clock)
    return PredictionService(store, router, instance_id="replica-1", clock=harness.clock)


async def crash_then_resume(url: str, n: int, providers: list[ScriptedProvider],
                            harness: Harness, schema: str | None) -> str:
    """Run one prediction until the crash after write `n`, then resume it in a
    fresh service (same instance id: a restart) and wait for its end."""
    crash = CrashAfter(n)
    crashed: list[asyncio.Task[None] | None] = []
    first_store = Store(url, schema=schema, after_write=crash)
    first = make_service(LoopTimeStore(first_store), providers, harness)  # type: ignore[arg-type]
    prediction_id = ""
    try:
        run = await first.submit(request())
        prediction_id = run.pred.id
        crashed.append(run.task)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.done.wait(), 3600)
    except SimulatedCrash:
        pass
    # SIGKILL: no shutdown writes. Stop what still runs in that "process".
    tasks = [t for t in [*crashed, *(r.task for r in first._runs.values()), first._sweeper]
             if t is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)  # retrieved: the crash is the point
    await first_store.dispose()
    if not prediction_id:  # died before the id reached the client: find the row
        rows, _ = await harness_rows(url, schema)
        if not rows:
            return ""
        prediction_id = rows[0].id

    second_store = Store(url, schema=schema)
    second = make_service(LoopTimeStore(second_store), providers, harness)  # type: ignore[arg-type]
    harness.services.append(second)
    await second.start()
    for _ in range(2000):
        found = await second_store.get_with_attempts(prediction_id)
        assert found is not None
        if found[0].status in ("completed", "failed", "canceled") and not second._runs:
            break
        await asyncio.sleep(0.05)
    return prediction_id


async def harness_rows(url: str, schema: str | None) -> tuple[list, str | None]:
    store = Store(url, schema=schema)
    try:
        return await store.list_predictions()
    finally:
        await store.dispose()


@pytest.fixture
async def schema(db_url: str) -> AsyncIterator[str | None]:
    if not db_url.startswith("postgresql"):
        yield None
        return
    name = f"flux_crash_{uuid.uuid4().hex[:10]}"
    store = Store(db_url, schema=name)
    await store.upgrade()
    await store.dispose()
    try:
        yield name
    finally:
        from sqlalchemy import text
        store = Store(db_url)
        async with store.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        await store.dispose()


async def check_ledger(url: str, schema: str | None, prediction_id: str,
                       providers: list[ScriptedProvider]) -> tuple[str, list[str]]:
    store = Store(url, schema=schema)
    try:
        found = await store.get_with_attempts(prediction_id)
    finally:
        await store.dispose()
    assert found is not None
    pred, attempts = found
    billed = {job: cost for p in providers for job, cost in p.billed.items()}
    for p in providers:
        assert p.submits <= 1, f"{p.name} was submitted to {p.submits} times"
    # Every upstream job is on exactly one attempt row, at the price it was billed.
    recorded = {a.upstream_id: a.cost_micro_usd for a in attempts if a.upstream_id}
    assert recorded == billed
    assert pred.cost_micro_usd == sum(a.cost_micro_usd for a in attempts)
    if pred.status == "completed":
        assert pred.outputs and len(pred.has_nsfw_contents or []) == len(pred.outputs)
    return pred.status, [a.status for a in attempts]


# Writes of one prediction served by one provider:
# 1 prediction + its first attempt (one transaction, before the POST),
# 2 attempt processing (upstream id), 3 attempt completed + prediction completed
# (one transaction).
ONE_PROVIDER = {
    # Died between the attempt row and the POST: a job may exist, so never resubmitted.
    1: ("failed", ["unknown"]),
    2: ("completed", ["completed"]),
    3: ("completed", ["completed"]),
}


@pytest.mark.parametrize("quote", [None, 30_000])  # list price, or quoted above it
@pytest.mark.parametrize("n", sorted(ONE_PROVIDER))
async def test_one_provider_crash_after_each_write(
        harness: Harness, db_url: str, schema: str | None, n: int, quote: int | None) -> None:
    a = ScriptedProvider("a", [Accept(polls=2, charged_micro_usd=quote)] * 2, settings=FAST)
    prediction_id = await crash_then_resume(db_url, n, [a], harness, schema)
    status, attempts = await check_ledger(db_url, schema, prediction_id, [a])
    assert (status, attempts) == ONE_PROVIDER[n]


# a's job fails upstream after acceptance (billed), b serves it:
# 1 prediction + attempt a, 2 a processing, 3 a failed, 4 begin b,
# 5 b processing, 6 b completed + prediction completed.
FAILOVER = {
    1: ("completed", ["unknown", "completed"]),
    2: ("completed", ["failed", "completed"]),
    3: ("completed", ["failed", "completed"]),
    4: ("failed", ["failed", "unknown"]),
    5: ("completed", ["failed", "completed"]),
    6: ("completed", ["failed", "completed"]),
}


@pytest.mark.parametrize("n", sorted(FAILOVER))
async def test_billed_failure_then_failover_crash_after_each_write(
        harness: Harness, db_url: str, schema: str | None, n: int) -> None:
    a = ScriptedProvider("a", [Accept(polls=1, then=Fail(ErrorKind.UNAVAILABLE))] * 2,
                         price_micro_usd=20_000, settings=FAST)
    b = ScriptedProvider("b", [Accept(polls=1)] * 2, price_micro_usd=12_000, settings=FAST)
    prediction_id = await crash_then_resume(db_url, n, [a, b], harness, schema)
    status, attempts = await check_ledger(db_url, schema, prediction_id, [a, b])
    assert (status, attempts) == FAILOVER[n]


async def test_nothing_saved_is_a_clear_error_and_leaves_no_row(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    a = ScriptedProvider("a", [Accept()])
    service = harness.service(a)

    async def down(*_: object, **__: object) -> None:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(harness.store, "create_prediction", down)
    monkeypatch.setattr(harness.store, "create_with_attempt", down)
    with pytest.raises(OperationalError):
        await service.submit(request())
    rows, _ = await harness.store.list_predictions()
    assert rows == [] and a.calls == []


