"""Cancel (during submit, during polling, during a hedge), the prediction
deadline, a prediction someone else finished, and the crash handler."""

from __future__ import annotations

import asyncio

import pytest

from providers.base import ErrorKind
from providers.testing import Accept, Hang, ScriptedProvider

from .conftest import Harness, finished, request

pytestmark = pytest.mark.looptime


async def test_cancel_while_polling_cancels_upstream_and_keeps_the_cost(
        harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=1000)])
    service = harness.service(a)
    run = await service.submit(request())
    await asyncio.sleep(30)
    pred, attempts = await service.cancel(run.pred.id)
    assert pred.status == "canceled" and pred.error == "canceled by client"
    assert ("cancel", "a-1") in a.calls
    assert attempts[0].status == "canceled"
    # The job ran upstream for 30 s: it is paid for, and the prediction says so.
    assert attempts[0].cost_micro_usd == pred.cost_micro_usd == a.billed["a-1"]


async def test_cancel_during_a_slow_submit_records_the_job_it_made(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(after_s=20, polls=1000)])
    service = harness.service(a)
    run = await service.submit(request())
    await asyncio.sleep(5)  # the POST is still on its way
    pred, _ = await service.cancel(run.pred.id)
    await finished(service, run)
    pred, attempts = await harness.rows(run.pred.id)
    assert pred.status == "canceled"
    # The submit was let finish so its upstream id was learned, then canceled there.
    assert a.jobs == ["a-1"] and ("cancel", "a-1") in a.calls
    assert attempts[0].upstream_id == "a-1" and attempts[0].status == "canceled"


async def test_cancel_during_a_hedge_stops_both_attempts(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=1000)])
    b = ScriptedProvider("b", [Accept(polls=1000)])
    service = harness.service(a, b, routes={"flux-dev": {"hedge": True, "hedge_delay_s": 10}})
    run = await service.submit(request())
    await asyncio.sleep(20)
    await service.cancel(run.pred.id)
    await finished(service, run)
    pred, attempts = await harness.rows(run.pred.id)
    assert pred.status == "canceled"
    assert sorted((x.provider, x.status) for x in attempts) == [
        ("a", "canceled"), ("b", "canceled")]
    assert ("cancel", "a-1") in a.calls and ("cancel", "b-1") in b.calls
    assert pred.cost_micro_usd == sum(a.billed.values()) + sum(b.billed.values())


async def test_cancel_of_a_finished_prediction_is_a_conflict(harness: Harness) -> None:
    from proxy.lifecycle.service import Conflict

    service = harness.service(ScriptedProvider("a", [Accept()]))
    run = await finished(service, await service.submit(request()))
    with pytest.raises(Conflict):
        await service.cancel(run.pred.id)


async def test_deadline_ends_a_job_that_never_finishes(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=100_000)])
    service = harness.service(a, deadline_s=120)
    run = await finished(service, await service.submit(request()))
    pred, attempts = await harness.rows(run.pred.id)
    assert pred.status == "failed" and pred.error_kind == ErrorKind.TIMEOUT.value
    assert attempts[0].status == "failed" and ("cancel", "a-1") in a.calls
    total = (pred.completed_at - pred.created_at).total_seconds()  # type: ignore[operator]
    assert 118 <= total <= 121  # in virtual time; the test itself takes milliseconds


async def test_deadline_during_a_hanging_submit_is_outcome_unknown(harness: Harness) -> None:
    a = ScriptedProvider("a", [Hang()])
    b = ScriptedProvider("b", [Accept()])
    service = harness.service(a, b, deadline_s=60)
    run = await finished(service, await service.submit(request()))
    pred, attempts = await harness.rows(run.pred.id)
    # The POST may have created a job: never resubmitted, charged as if it had.
    assert [(x.provider, x.status) for x in attempts] == [("a", "unknown")]
    assert attempts[0].cost_micro_usd == a.price_micro_usd
    assert pred.status == "failed" and b.calls == []


async def test_someone_else_finishing_it_first_wins(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=10)])
    service = harness.service(a)
    run = await service.submit(request())
    await asyncio.sleep(3)
    # Another replica (or a cancel handled elsewhere) ended it meanwhile.
    assert await harness.store.finish_prediction(run.pred.id, status="canceled",
                                                 error="canceled elsewhere")
    await finished(service, run)
    pred, _ = await harness.rows(run.pred.id)
    assert pred.status == "canceled" and pred.error == "canceled elsewhere"
    assert run.pred.status == "canceled"  # the in-memory answer agrees with the row


async def test_a_crash_inside_the_lifecycle_fails_the_prediction_cleanly(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    a = ScriptedProvider("a", [Accept(polls=1)])
    service = harness.service(a)
    async def broken(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire")

    # The write that records the upstream id fails: a bug or a store outage.
    monkeypatch.setattr(service.runner.attempts.store, "accept_attempt", broken)
    run = await finished(service, await service.submit(request()))
    pred, attempts = await harness.rows(run.pred.id)
    assert pred.status == "failed" and pred.error == "internal error: RuntimeError"
    assert run.done.is_set()
    # The job it made upstream may be billed: its attempt is closed at that price.
    assert attempts[0].status == "unknown" and attempts[0].cost_micro_usd == a.billed["a-1"]
    assert pred.cost_micro_usd == a.billed["a-1"]
