"""Follow an accepted upstream job until it is terminal: bounded, cancellable polling."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from tenacity import Future as Attempt
from tenacity import RetryError

from common.clock import Clock
from providers.base import ErrorKind, Provider, ProviderError, UpstreamJob
from proxy.lifecycle.run import Signal


class Canceled(Exception):
    """The client canceled the prediction while it ran."""


@dataclass(slots=True)
class PollTrace:
    """What one job's polls saw, in seconds since the wait began (for ready.py)."""

    running_at_s: float | None = None  # the last poll that found it still running
    done_at_first_poll_s: float | None = None  # the first poll found it done


def _transient(exc: BaseException) -> bool:
    """Poll errors worth another GET: anything retryable except a bad key."""
    return (isinstance(exc, ProviderError) and exc.retryable and not exc.final
            and exc.kind is not ErrorKind.AUTH)


def backoff_s(multiplier: float, exp_base: float, max_s: float, attempt: int) -> float:
    """tenacity's wait_exponential (min 0) before attempt `attempt` + 1."""
    exponent = attempt - 1
    if (multiplier > 0 and max_s > 0 and exp_base > 1 and math.isfinite(max_s)
            and exponent > math.log(max_s, exp_base) - math.log(multiplier, exp_base)):
        return max(0.0, max_s)
    try:
        result = multiplier * exp_base**exponent
    except OverflowError:
        return max_s
    return max(0.0, min(result, max_s))


async def _sleep(cancel: asyncio.Event | Signal, seconds: float) -> bool:
    """True when `cancel` was set before `seconds` passed."""
    if isinstance(cancel, Signal):
        return await cancel.sleep(seconds)
    try:
        await asyncio.wait_for(cancel.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def wait_terminal(
    provider: Provider, job: UpstreamJob, until: datetime, cancel: asyncio.Event | Signal,
    clock: Clock, trace: PollTrace | None = None,
    on_progress: Callable[[tuple[int, int]], None] | None = None,
) -> UpstreamJob:
    """Poll with backoff (the provider's poll_initial_s * poll_multiplier^n, capped
    at poll_max_s) until terminal. The first poll waits for the job's
    `ready_after_s` (the upstream's own estimate of its earliest end, or one learned
    from its recent jobs) when that is longer, but leaves time for a poll before
    `until`; the polls after it are spaced as for a job of that age. Transient poll errors are
    retried, Retry-After is honoured. Raises `tenacity.RetryError` at `until`,
    `Canceled` when `cancel` is set, and non-transient `ProviderError`s as they come.

    The loop is tenacity's AsyncRetrying(retry=non-terminal or transient, wait,
    stop before `until`, reraise=True) written out: one coroutine and locals per job
    in flight, where AsyncRetrying kept a retry state, a statistics thread-local, a
    concurrent Future per outcome and closures per iteration."""
    s = provider.settings
    multiplier, exp_base, max_s = s.poll_initial_s, s.poll_multiplier, s.poll_max_s
    hint = job.ready_after_s
    if hint is None or not math.isfinite(hint) or hint <= 0:
        hint = None
    started = clock.now()
    # The backoff's delay once a job is `age` seconds old is about age * (m - 1) / m
    # (a geometric series); after a long first wait (the hint) it continues from
    # there instead of restarting at poll_initial_s.
    growth = (exp_base - 1) / exp_base
    current = job  # the job as last seen (a failed poll leaves it as it was)
    error: BaseException | None = None  # the last poll's error, if it failed
    attempt = 1  # attempt 1 is the job as accepted (or resumed): no GET before a wait
    while True:
        if error is None:
            if current.status.terminal:
                return current
        elif not _transient(error):
            raise error
        delay = backoff_s(multiplier, exp_base, max_s, attempt)
        if attempt == 1 and hint is not None:
            # No GET before the upstream can be done; but one before the deadline.
            left = (until - clock.now()).total_seconds()
            delay = max(delay, min(hint, left - delay))
        elif hint is not None and growth > 0:
            age = (clock.now() - started).total_seconds()
            delay = max(delay, min(max_s, age * growth))
        if isinstance(error, ProviderError) and error.retry_after:
            delay = max(delay, error.retry_after)
        # The deadline reads `clock` (virtual-time tests keep it), not time.monotonic.
        if (until - clock.now()).total_seconds() <= delay:
            if error is not None:
                raise error
            raise RetryError(Attempt.construct(attempt, current, False))
        if await _sleep(cancel, delay):
            raise Canceled
        attempt += 1
        try:
            current, error = await provider.poll(current), None
        except Exception as exc:  # tenacity kept any error as the outcome, to judge
            error = exc
        else:
            if on_progress is not None and current.progress is not None:
                on_progress(current.progress)
            if trace is not None:
                at = (clock.now() - started).total_seconds()
                if not current.status.terminal:
                    trace.running_at_s = at
                elif attempt == 2:
                    trace.done_at_first_poll_s = at
