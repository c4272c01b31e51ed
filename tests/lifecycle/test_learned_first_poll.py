"""An upstream that gives no estimate of its end (WaveSpeed) is not polled before
its recent jobs were still running (proxy/routing/ready.py)."""

from __future__ import annotations

import asyncio

import pytest

from providers.base import UpstreamJob
from providers.testing import Accept, ScriptedProvider, scripted_settings
from proxy.routing.ready import MIN_SAMPLES as READY_MIN_SAMPLES

from .conftest import Harness, finished, request

pytestmark = pytest.mark.looptime


class Timed(ScriptedProvider):
    """Records when (virtual time) each poll came."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.poll_times: list[float] = []

    async def poll(self, job: UpstreamJob) -> UpstreamJob:
        self.poll_times.append(asyncio.get_running_loop().time())
        return await super().poll(job)


async def first_poll_after(service: object, a: Timed) -> float:
    start = asyncio.get_running_loop().time()
    a.poll_times.clear()
    run = await service.submit(request())  # type: ignore[attr-defined]
    await finished(service, run)  # type: ignore[arg-type]
    assert run.pred.status == "completed"
    return a.poll_times[0] - start


async def test_first_poll_waits_for_what_recent_jobs_took(harness: Harness) -> None:
    # Each job answers 10 processing polls, one a second: it takes about 11 s.
    settings = scripted_settings(poll_initial_s=1.0, poll_max_s=1.0, poll_multiplier=1.0)
    a = Timed("a", [Accept(polls=10)] * (READY_MIN_SAMPLES + 1), settings=settings)
    service = harness.service(a)
    before = await first_poll_after(service, a)
    assert before == pytest.approx(1.0, abs=0.1)  # nothing learned yet: poll_initial_s
    for _ in range(READY_MIN_SAMPLES - 1):
        await first_poll_after(service, a)
    learned = await first_poll_after(service, a)
    assert learned >= 9.5  # the others were still running 10 s in: not 1 s
