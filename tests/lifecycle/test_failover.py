"""Failover on the scripted provider: the order providers are tried in, which
errors move on to the next provider, and that a provider which may have a job
for this prediction is never submitted to again."""

from __future__ import annotations

import pytest

from providers.base import ErrorKind
from providers.testing import Accept, Complete, Fail, Raise, ScriptedProvider

from .conftest import Harness, finished, request

pytestmark = pytest.mark.looptime

FAILS_OVER = [ErrorKind.UNAVAILABLE, ErrorKind.TIMEOUT, ErrorKind.MALFORMED, ErrorKind.AUTH]
STAYS = [ErrorKind.POLICY, ErrorKind.INVALID_INPUT]


async def test_first_provider_serves_when_healthy(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=3)])
    b = ScriptedProvider("b")
    service = harness.service(a, b)
    run = await finished(service, await service.submit(request()))
    pred, attempts = await harness.rows(run.pred.id)
    assert pred.status == "completed" and pred.provider == "a"
    assert pred.outputs == ["https://assets.scripted.invalid/a-1/0.jpeg"]
    assert [x.status for x in attempts] == ["completed"]
    assert a.calls == [("submit", None)] + [("poll", "a-1")] * 4
    assert b.calls == []
    assert pred.cost_micro_usd == a.billed["a-1"] == attempts[0].cost_micro_usd


@pytest.mark.parametrize("kind", FAILS_OVER)
async def test_retryable_submit_errors_fail_over_in_route_order(
        harness: Harness, kind: ErrorKind) -> None:
    a = ScriptedProvider("a", [Raise(kind)])
    b = ScriptedProvider("b", [Raise(ErrorKind.UNAVAILABLE)])
    c = ScriptedProvider("c", [Accept()])
    service = harness.service(a, b, c)
    run = await finished(service, await service.submit(request()))
    pred, attempts = await harness.rows(run.pred.id)
    assert pred.status == "completed" and pred.provider == "c"
    assert [(x.provider, x.status, x.error_kind) for x in attempts] == [
        ("a", "failed", kind.value), ("b", "failed", "unavailable"), ("c", "completed", None)]
    # Nothing was created upstream by the failed submits: nothing is charged for them.
    assert [x.cost_micro_usd for x in attempts[:2]] == [0, 0]
    assert pred.cost_micro_usd == c.billed["c-1"]


@pytest.mark.parametrize("kind", STAYS)
async def test_policy_and_invalid_input_end_the_prediction(
        harness: Harness, kind: ErrorKind) -> None:
    a = ScriptedProvider("a", [Accept(polls=1, then=Fail(kind, "refused"))])
    b = ScriptedProvider("b", [Accept()])
    service = harness.service(a, b)
    run = await finished(service, await service.submit(request()))
    pred, attempts = await harness.rows(run.pred.id)
    assert pred.status == "failed" and pred.error_kind == kind.value
    assert "refused" in (pred.error or "")
    assert b.calls == []  # the next provider would refuse the same request
    assert [x.provider for x in attempts] == ["a"]


async def test_failed_upstream_job_fails_over_and_both_are_billed(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=2, then=Fail(ErrorKind.UNAVAILABLE))],
                         price_micro_usd=20_000)
    b = ScriptedProvider("b", [Accept()], price_micro_usd=12_000)
    service = harness.service(a, b)
    run = await finished(service, await service.submit(request()))
    pred, attempts = await harness.rows(run.pred.id)
    assert pred.status == "completed" and pred.provider == "b"
    assert [(x.provider, x.status, x.cost_micro_usd) for x in attempts] == [
        ("a", "failed", 20_000), ("b", "completed", 12_000)]
    assert pred.cost_micro_usd == sum(a.billed.values()) + sum(b.billed.values()) == 32_000


async def test_outcome_unknown_is_never_submitted_again_to_that_provider(
        harness: Harness) -> None:
    a = ScriptedProvider("a", [Raise(ErrorKind.OUTCOME_UNKNOWN), Accept()])
    b = ScriptedProvider("b", [Raise(ErrorKind.UNAVAILABLE)])
    service = harness.service(a, b, max_attempts=6)
    run = await finished(service, await service.submit(request()))
    pred, attempts = await harness.rows(run.pred.id)
    assert a.submits == 1  # a may hold a (billed) job for this prediction
    assert pred.status == "failed"
    assert [(x.provider, x.status) for x in attempts] == [("a", "unknown"), ("b", "failed")]
    # The unknown attempt is charged what a job would cost there: it may exist.
    assert attempts[0].cost_micro_usd == a.price_micro_usd
    assert pred.cost_micro_usd == a.price_micro_usd


async def test_rate_limited_provider_is_retried_after_its_cooldown(harness: Harness) -> None:
    a = ScriptedProvider("a", [Raise(ErrorKind.RATE_LIMITED, retry_after=30), Accept()])
    service = harness.service(a, unavailable_wait_s=60)
    run = await finished(service, await service.submit(request()))
    pred, attempts = await harness.rows(run.pred.id)
    assert pred.status == "completed" and a.submits == 2
    assert [x.status for x in attempts] == ["failed", "completed"]
    waited = (attempts[1].created_at - attempts[0].created_at).total_seconds()
    assert 30 <= waited < 31  # honoured Retry-After, in virtual time


async def test_transient_poll_errors_are_retried_on_the_same_job(harness: Harness) -> None:
    a = ScriptedProvider("a", [Accept(polls=["processing", Raise(ErrorKind.UNAVAILABLE),
                                             Raise(ErrorKind.TIMEOUT), "processing"],
                                      then=Complete(nsfw=[True]))])
    service = harness.service(a)
    run = await finished(service, await service.submit(request()))
    pred, _ = await harness.rows(run.pred.id)
    assert pred.status == "completed" and pred.has_nsfw_contents == [True]
    assert a.submits == 1 and a.jobs == ["a-1"]


async def test_max_attempts_bounds_submits(harness: Harness) -> None:
    providers = [ScriptedProvider(n, [Raise(ErrorKind.UNAVAILABLE)]) for n in "abcd"]
    service = harness.service(*providers, max_attempts=2)
    run = await finished(service, await service.submit(request()))
    pred, attempts = await harness.rows(run.pred.id)
    assert pred.status == "failed" and len(attempts) == 2
    assert [p.submits for p in providers] == [1, 1, 0, 0]


async def test_an_inline_image_is_kept_only_while_a_resume_may_need_it(
        harness: Harness) -> None:
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(png, format="PNG")
    inline = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    a = ScriptedProvider("a", [Accept(polls=3)])
    service = harness.service(a)
    run = await service.submit(request(image=inline, strength=0.6))
    stored = await harness.store.get_prediction(run.pred.id)
    assert stored is not None and stored.request["image"] == inline  # a resume resends it
    await finished(service, run)
    pred, _ = await harness.rows(run.pred.id)
    assert pred.status == "completed"
    assert pred.request["image"].startswith("sha256:") and len(pred.request["image"]) == 71
