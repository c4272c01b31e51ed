"""The polling loop without tenacity, and the lifecycle's cheap signals: the same
spacing, deadline, error handling and cancel as the AsyncRetrying it replaced,
with one future and one timer per sleep (bench/inflight_memory.py measures it)."""

from __future__ import annotations

import asyncio
import gc
from datetime import timedelta

import pytest
from tenacity import RetryCallState, RetryError, wait_exponential

from providers.base import ErrorKind, JobStatus, UpstreamJob
from providers.testing import Accept, FakeClock, Raise, ScriptedProvider, scripted_settings
from proxy.lifecycle.polling import Canceled, backoff_s, wait_terminal
from proxy.lifecycle.run import CancelSignal, Signal

pytestmark = pytest.mark.looptime


@pytest.mark.parametrize(("multiplier", "base", "max_s"), [
    (0.25, 1.5, 2.0), (1.0, 1.0, 1.0), (0.5, 2.0, 30.0), (3.0, 1.2, 10.0), (0.1, 10.0, 1e9)])
def test_backoff_is_tenacitys_wait_exponential(multiplier: float, base: float,
                                               max_s: float) -> None:
    theirs = wait_exponential(multiplier=multiplier, exp_base=base, max=max_s)
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    for attempt in range(1, 400):
        state.attempt_number = attempt
        assert backoff_s(multiplier, base, max_s, attempt) == theirs(state)


async def test_sleep_runs_its_time_or_ends_at_set() -> None:
    loop = asyncio.get_running_loop()
    signal = Signal()
    start = loop.time()
    assert await signal.sleep(3.0) is False
    assert loop.time() - start == pytest.approx(3.0, abs=0.01)
    loop.call_later(1.0, signal.set)
    start = loop.time()
    assert await signal.sleep(60.0) is True
    assert loop.time() - start == pytest.approx(1.0, abs=0.01)
    assert await signal.sleep(60.0) is True  # already set: at once
    assert signal._waiters is None  # nothing is kept after a wait


async def test_wait_and_fire_like_an_event() -> None:
    signal = CancelSignal()
    waiters = [asyncio.create_task(signal.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not signal.is_set() and signal._waiters is not None
    signal.fire("hedge lost")
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert signal.is_set() and signal.reason == "hedge lost" and signal._waiters is None
    signal.clear()
    assert not signal.is_set()
    # A waiter canceled (wait_for's timeout) leaves nothing behind.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(signal.wait(), timeout=1.0)
    assert signal._waiters is None


def _provider(*steps: Accept | Raise, **settings: float) -> ScriptedProvider:
    return ScriptedProvider("p", list(steps), settings=scripted_settings(**settings))


async def _accepted(provider: ScriptedProvider) -> UpstreamJob:
    from .conftest import request

    return await provider.submit(request().to_generation(7))


async def test_polls_are_spaced_by_the_backoff_until_terminal() -> None:
    provider = _provider(Accept(polls=5), poll_initial_s=1.0, poll_multiplier=2.0,
                         poll_max_s=4.0)
    job = await _accepted(provider)
    clock = FakeClock()
    loop = asyncio.get_running_loop()
    start = loop.time()
    done = await wait_terminal(provider, job, clock.now() + timedelta(seconds=300),
                               CancelSignal(), clock)
    assert done.status is JobStatus.COMPLETED
    assert [op for op, _ in provider.calls].count("poll") == 6
    assert loop.time() - start == pytest.approx(1 + 2 + 4 + 4 + 4 + 4, abs=0.05)


async def test_deadline_raises_retry_error_or_the_last_transient_error() -> None:
    clock = FakeClock()
    provider = _provider(Accept(polls=1000))
    job = await _accepted(provider)
    with pytest.raises(RetryError):
        await wait_terminal(provider, job, clock.now() + timedelta(seconds=10),
                            CancelSignal(), clock)
    flaky = _provider(Accept(polls=[Raise(ErrorKind.UNAVAILABLE)] * 1000))
    job = await _accepted(flaky)
    with pytest.raises(Exception) as raised:  # reraise=True: the error itself
        await wait_terminal(flaky, job, clock.now() + timedelta(seconds=10),
                            CancelSignal(), clock)
    assert not isinstance(raised.value, RetryError)
    assert getattr(raised.value, "kind", None) is ErrorKind.UNAVAILABLE


async def test_a_final_error_is_raised_at_once_and_cancel_stops_the_sleep() -> None:
    clock = FakeClock()
    auth = _provider(Accept(polls=[Raise(ErrorKind.AUTH)]))
    job = await _accepted(auth)
    with pytest.raises(Exception) as raised:
        await wait_terminal(auth, job, clock.now() + timedelta(seconds=300), CancelSignal(),
                            clock)
    assert getattr(raised.value, "kind", None) is ErrorKind.AUTH
    assert [op for op, _ in auth.calls].count("poll") == 1
    slow = _provider(Accept(polls=1000), poll_initial_s=30.0, poll_max_s=30.0)
    job = await _accepted(slow)
    cancel = CancelSignal()
    loop = asyncio.get_running_loop()
    loop.call_later(5.0, cancel.fire, "canceled by client")
    start = loop.time()
    with pytest.raises(Canceled):
        await wait_terminal(slow, job, clock.now() + timedelta(seconds=300), cancel, clock)
    assert loop.time() - start == pytest.approx(5.0, abs=0.01)


async def test_a_sleeping_poll_holds_no_task_of_its_own() -> None:
    """wait_for(event.wait()) made a Task per sleep; the signal's sleep makes none."""
    provider = _provider(*[Accept(polls=1000) for _ in range(50)], poll_initial_s=60.0,
                         poll_max_s=60.0)
    clock = FakeClock()
    until = clock.now() + timedelta(seconds=3000)
    jobs = [await _accepted(provider) for _ in range(50)]
    before = len(asyncio.all_tasks())
    tasks = [asyncio.create_task(wait_terminal(provider, j, until, CancelSignal(), clock))
             for j in jobs]
    await asyncio.sleep(0.1)
    gc.collect()
    assert len(asyncio.all_tasks()) - before == 50
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
