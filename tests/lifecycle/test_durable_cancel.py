"""Durable cancel: once a cancel has answered, no process submits upstream for
that prediction, and the answer says what is (still) upstream."""

from __future__ import annotations

import asyncio

import pytest

from providers.testing import Accept, ScriptedProvider
from proxy.lifecycle.service import PredictionService
from proxy.store.models import Attempt, Prediction

from .conftest import Harness, finished, request

pytestmark = pytest.mark.looptime


def queued_only(service: PredictionService) -> PredictionService:
    """Admission finds no provider free: the prediction is written `queued`, with
    no attempt (the runner routes it later)."""
    service.runner.acquire = lambda providers: None  # type: ignore[method-assign]
    return service


async def cancel_while_nobody_drives(harness: Harness, first: PredictionService,
                                     a: ScriptedProvider) -> tuple[Prediction, list[Attempt]]:
    """`first` admits a prediction and its driver dies before any POST; the cancel
    flag is set and the lease released; another replica resumes it to its end."""
    run = await first.submit(request())
    run.task.cancel()  # type: ignore[union-attr]
    await harness.store.request_cancel(run.pred.id)
    await harness.store.release(run.pred.id, "test-1")
    resumer = harness.service(a, instance="test-2")
    await resumer.start()
    resumed = resumer._runs.get(run.pred.id)
    assert resumed is not None
    await finished(resumer, resumed)
    return await harness.rows(run.pred.id)


async def test_a_flag_set_while_nobody_drove_it_stops_the_resumer(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept()])
    pred, attempts = await cancel_while_nobody_drives(harness, queued_only(harness.service(a)), a)
    assert pred.status == "canceled" and attempts == [] and a.calls == []


async def test_cancel_of_an_orphan_with_nothing_upstream_answers_canceled(
        harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept()])
    first = queued_only(harness.service(a))
    run = await first.submit(request())
    run.task.cancel()  # type: ignore[union-attr]
    other = harness.service(a, instance="test-2")  # another replica gets the cancel
    pred, _ = await other.cancel(run.pred.id)
    assert pred.status == "canceled"
    assert (await harness.rows(run.pred.id))[0].status == "canceled"
    # The first replica comes back: nothing to resume, nothing submitted.
    again = harness.service(a, instance="test-1")
    await again.start()
    assert again._runs == {} and a.calls == []


async def test_a_driver_dead_between_admission_and_submit_is_never_resubmitted(
        harness: Harness) -> None:
    # The first attempt's row is written with the prediction, before the POST: a
    # driver that died there may have sent it, so the resumer closes it unknown.
    a = ScriptedProvider("a", [Accept()])
    pred, attempts = await cancel_while_nobody_drives(harness, harness.service(a), a)
    assert pred.status == "canceled" and a.calls == []
    assert [x.status for x in attempts] == ["unknown"]
    assert pred.cost_micro_usd == attempts[0].cost_micro_usd > 0  # charged as if it landed


async def test_no_attempt_can_begin_after_the_cancel_flag(harness: Harness) -> None:
    service = harness.service(ScriptedProvider("a", [Accept(polls=100)]))
    run = await service.submit(request())
    await harness.store.request_cancel(run.pred.id)
    late = Attempt(prediction_id=run.pred.id, seq=99, provider="a")
    assert await harness.store.begin_attempt(late) is False
    _, attempts = await harness.rows(run.pred.id)
    assert all(x.seq != 99 for x in attempts)


async def test_cancel_of_an_orphan_with_a_job_upstream_cancels_that_job(
        harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=1000)])
    first = harness.service(a)
    run = await first.submit(request())
    for _ in range(50):  # until the job is accepted upstream
        if a.jobs:
            break
        await asyncio.sleep(1)
    run.task.cancel()  # type: ignore[union-attr]  # the driver dies mid-poll
    await harness.store.release(run.pred.id, "test-1")
    other = harness.service(a, instance="test-2")
    pred, attempts = await other.cancel(run.pred.id)
    # It took the orphan over and stopped the job upstream before answering.
    assert pred.status == "canceled" and ("cancel", "a-1") in a.calls
    assert attempts[0].status == "canceled" and a.submits == 1
