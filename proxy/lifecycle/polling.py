"""Follow an accepted upstream job until it is terminal: bounded, cancellable polling."""

from __future__ import annotations

import asyncio
import math
from datetime import datetime

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_result,
    wait_exponential,
)

from common.clock import Clock
from providers.base import ErrorKind, Provider, ProviderError, UpstreamJob


class Canceled(Exception):
    """The client canceled the prediction while it ran."""


def _transient(exc: BaseException) -> bool:
    """Poll errors worth another GET: anything retryable except a bad key."""
    return (isinstance(exc, ProviderError) and exc.retryable and not exc.final
            and exc.kind is not ErrorKind.AUTH)


async def wait_terminal(
    provider: Provider, job: UpstreamJob, until: datetime, cancel: asyncio.Event, clock: Clock
) -> UpstreamJob:
    """Poll with backoff (the provider's poll_initial_s * poll_multiplier^n, capped
    at poll_max_s) until terminal. The first poll waits for the job's
    `ready_after_s` (the upstream's own estimate of its earliest end, or one learned
    from its recent jobs) when that is longer, but leaves time for a poll before
    `until`; the polls after it are spaced as for a job of that age. Transient poll errors are
    retried, Retry-After is honoured. Raises `tenacity.RetryError` at `until`,
    `Canceled` when `cancel` is set, and non-transient `ProviderError`s as they come."""
    s = provider.settings
    backoff = wait_exponential(
        multiplier=s.poll_initial_s, exp_base=s.poll_multiplier, max=s.poll_max_s
    )
    hint = job.ready_after_s
    if hint is None or not math.isfinite(hint) or hint <= 0:
        hint = None
    started = clock.now()
    # The backoff's delay once a job is `age` seconds old is about age * (m - 1) / m
    # (a geometric series); after a long first wait (the hint) it continues from
    # there instead of restarting at poll_initial_s.
    growth = (s.poll_multiplier - 1) / s.poll_multiplier

    def wait(state: RetryCallState) -> float:
        delay = backoff(state)
        if state.attempt_number == 1 and hint is not None:
            # No GET before the upstream can be done; but one before the deadline.
            left = (until - clock.now()).total_seconds()
            delay = max(delay, min(hint, left - delay))
        elif hint is not None and growth > 0:
            age = (clock.now() - started).total_seconds()
            delay = max(delay, min(s.poll_max_s, age * growth))
        outcome = state.outcome
        if outcome is not None and outcome.failed:
            exc = outcome.exception()
            if isinstance(exc, ProviderError) and exc.retry_after:
                delay = max(delay, exc.retry_after)
        return delay

    async def sleep(seconds: float) -> None:
        try:
            await asyncio.wait_for(cancel.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise Canceled

    current = job
    first = True

    async def poll_once() -> UpstreamJob:
        nonlocal current, first
        if first:  # the job was just accepted (or resumed): wait before the first GET
            first = False
            return current
        current = await provider.poll(current)
        return current

    def stop(state: RetryCallState) -> bool:
        # tenacity's own stop_before_delay reads time.monotonic; ours reads `clock`,
        # so virtual-time tests keep the deadline.
        upcoming = state.upcoming_sleep or 0.0
        return (until - clock.now()).total_seconds() <= upcoming

    retrying = AsyncRetrying(
        retry=retry_if_result(lambda j: not j.status.terminal) | retry_if_exception(_transient),
        wait=wait,
        stop=stop,
        sleep=sleep,
        reraise=True,
    )
    result: UpstreamJob = await retrying(poll_once)
    return result
