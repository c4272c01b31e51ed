"""No poll before the upstream can be done: VibeDream's `estimatedTime` ("5-15s")
makes the first poll wait for its low end, within the deadline; a missing or
unreadable estimate polls as the settings say. In virtual time (looptime), on
the real VibeDream adapter over an in-process `httpx.MockTransport`."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, cast

import httpx
import pytest
from tenacity import RetryError

from providers.base import GenerationRequest, JobStatus, Provider, UpstreamJob
from providers.registry import build_provider
from providers.testing import FakeClock
from providers.vibedream import ready_after_s
from proxy.lifecycle.polling import Canceled, wait_terminal

from .conftest import Harness, finished, request

pytestmark = pytest.mark.looptime

BASE = "https://api.vibedream.ai"
ABSENT = object()


class FakeVibeDream:
    """VibeDream's wire: the submit answers with `estimate` (ABSENT: no field), the
    job completes `done_after_s` after it. Records when each poll came, in seconds
    after the submit."""

    def __init__(self, estimate: object = "5-15s", done_after_s: float = 6.0) -> None:
        self.estimate = estimate
        self.done_after_s = done_after_s
        self.submitted_at: float | None = None
        self.polls: list[float] = []

    async def __call__(self, req: httpx.Request) -> httpx.Response:
        now = asyncio.get_running_loop().time()
        if req.method == "POST":
            self.submitted_at = now
            body: dict[str, Any] = {"id": "job-1", "status": "processing",
                                    "statusUrl": f"{BASE}/api/v1/predictions/job-1",
                                    "costCents": 2, "createdAt": "2026-11-21T21:30:00.000Z"}
            if self.estimate is not ABSENT:
                body["estimatedTime"] = self.estimate
            return httpx.Response(200, json=body)
        assert self.submitted_at is not None
        since = now - self.submitted_at
        self.polls.append(since)
        done = since >= self.done_after_s
        return httpx.Response(200, json={
            "id": "job-1", "modelId": "flux-dev", "modelName": "FLUX.1 Dev",
            "status": "completed" if done else "processing",
            "outputs": ["https://assets.vibedream.ai/outputs/job-1/0.jpeg"] if done else None,
            "error": None})


def _gen() -> GenerationRequest:
    return GenerationRequest(prompt="a lighthouse", seed=1, width=512, height=512)


def vibedream(fake: FakeVibeDream, **settings: Any) -> Provider:
    return build_provider("vibedream", "vibedream", {"base_url": BASE, "api_key": "k",
                                                     **settings},
                          transport=httpx.MockTransport(fake))


# --------------------------------------------------------------------------- the estimate


@pytest.mark.parametrize(("estimate", "seconds"), [
    ("5-15s", 5.0), ("~5-15s", 5.0), (" 5 - 15 s ", 5.0), ("5\u201315s", 5.0), ("10s", 10.0),
    ("2.5-4s", 2.5), ("5-15 seconds", 5.0), ("1-2 min", 60.0), ("0-1s", 0.0), (7, 7.0),
    ("", None), ("soon", None), ("5-15h", None), ("-5s", None), ("nan", None),
    (None, None), (True, None), ([5, 15], None), ("1e9s", None), ("400s", None),
])
def test_the_low_end_of_estimated_time(estimate: object, seconds: float | None) -> None:
    # 0 is no estimate worth waiting for; past the deadline (300 s) it is not believed.
    got = ready_after_s(estimate, limit_s=300.0)
    assert got == seconds


async def test_the_adapter_puts_the_estimate_on_the_job() -> None:
    for estimate, expected in (("5-15s", 5.0), ("garbage", None), (ABSENT, None)):
        provider = vibedream(FakeVibeDream(estimate))
        try:
            job = await provider.submit(_gen())
        finally:
            await provider.aclose()
        assert job.ready_after_s == expected


# --------------------------------------------------------------------------- wait_terminal


async def follow(provider: Provider, job: UpstreamJob, *, deadline_s: float = 300.0,
                 cancel: asyncio.Event | None = None) -> UpstreamJob:
    clock = FakeClock()
    until = clock.now() + timedelta(seconds=deadline_s)
    return await wait_terminal(provider, job, until, cancel or asyncio.Event(), clock)


async def test_a_5_to_15s_job_is_not_polled_before_5s() -> None:
    fake = FakeVibeDream("5-15s", done_after_s=6.0)
    provider = vibedream(fake)
    try:
        job = await provider.submit(_gen())
        done = await follow(provider, job)
    finally:
        await provider.aclose()
    assert done.status is JobStatus.COMPLETED
    assert fake.polls[0] >= 5.0 and min(fake.polls) >= 5.0
    # Then the usual backoff (0.25 s x 1.5^n): a handful of polls, not one per 0.25 s.
    assert len(fake.polls) <= 5


async def test_after_the_estimate_polls_are_spaced_for_the_jobs_age() -> None:
    # A 10-30 s job estimated "10-30s", done at 20 s: polls resume at the backoff's
    # cap (2 s) for a job that old, not at 0.25 s again: a handful, not a dozen.
    fake = FakeVibeDream("10-30s", done_after_s=20.0)
    provider = vibedream(fake)
    try:
        done = await follow(provider, await provider.submit(_gen()))
    finally:
        await provider.aclose()
    assert done.status is JobStatus.COMPLETED
    assert fake.polls[0] >= 10.0
    gaps = [b - a for a, b in zip(fake.polls, fake.polls[1:], strict=False)]
    assert gaps and min(gaps) >= 1.9
    assert len(fake.polls) <= 7


@pytest.mark.parametrize("estimate", ["garbage", ABSENT, "0-1s"])
async def test_without_a_usable_estimate_polls_start_at_poll_initial_s(estimate: object) -> None:
    fake = FakeVibeDream(estimate, done_after_s=6.0)
    provider = vibedream(fake)
    try:
        done = await follow(provider, await provider.submit(_gen()))
    finally:
        await provider.aclose()
    assert done.status is JobStatus.COMPLETED
    assert fake.polls[0] == pytest.approx(0.25, abs=0.01)  # poll_initial_s, as before


async def test_an_estimate_past_the_deadline_still_polls_before_it() -> None:
    fake = FakeVibeDream("5-15s", done_after_s=3.0)
    provider = vibedream(fake)
    try:
        job = await provider.submit(_gen())
        done = await follow(provider, job, deadline_s=4.0)  # the hint alone would pass it
    finally:
        await provider.aclose()
    assert done.status is JobStatus.COMPLETED
    assert 3.0 <= fake.polls[0] < 4.0


async def test_a_job_past_its_deadline_still_ends_in_retry_error() -> None:
    fake = FakeVibeDream("5-15s", done_after_s=1000.0)
    provider = vibedream(fake)
    try:
        job = await provider.submit(_gen())
        with pytest.raises(RetryError):
            await follow(provider, job, deadline_s=30.0)
    finally:
        await provider.aclose()
    assert fake.polls and fake.polls[0] >= 5.0 and max(fake.polls) < 30.0


async def test_cancel_ends_the_wait_for_the_estimate() -> None:
    fake = FakeVibeDream("60-90s", done_after_s=100.0)
    provider = vibedream(fake)
    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        job = await provider.submit(_gen())
        assert job.ready_after_s == 60.0
        loop.call_later(2.0, cancel.set)
        start = loop.time()
        with pytest.raises(Canceled):
            await follow(provider, job, cancel=cancel)
        assert loop.time() - start == pytest.approx(2.0, abs=0.01)
    finally:
        await provider.aclose()
    assert fake.polls == []


# --------------------------------------------------------------------------- the lifecycle


async def test_a_prediction_on_vibedream_waits_for_the_estimate(harness: Harness) -> None:
    fake = FakeVibeDream("5-15s", done_after_s=7.0)
    provider = vibedream(fake)
    try:
        service = harness.service(cast(Any, provider))
        run = await finished(service, await service.submit(request(size="512*512")))
        pred, attempts = await harness.rows(run.pred.id)
    finally:
        await provider.aclose()
    assert pred.status == "completed" and attempts[0].status == "completed"
    assert fake.polls and min(fake.polls) >= 5.0
