"""A circuit breaker per provider: closed -> open -> half-open -> closed.

Opens on `failure_threshold` consecutive failures, or when the error rate over
the last `window_s` reaches `error_rate_threshold` with at least `min_calls`
calls. Outcomes come back out of order (a 5xx in milliseconds, a success after
the whole job), so a failure streak only counts once every request that
started before the streak has finished: a burst's fast failures cannot open
the breaker while its slow successes are still running. While open the provider
gets no traffic; after `cooldown_s` it is half-open and lets at most
`half_open_probes` requests through at once: one success closes it, one failure
opens it again. State is per process; with Redis, an open is shared with the
other processes (`trip`, routing/sharing.py), each of which then probes on its own.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable

from pydantic import BaseModel, Field


class BreakerSettings(BaseModel):
    failure_threshold: int = Field(default=5, ge=1)
    error_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    window_s: float = Field(default=60.0, gt=0)
    min_calls: int = Field(default=20, ge=1)
    cooldown_s: float = Field(default=30.0, gt=0)
    half_open_probes: int = Field(default=1, ge=1)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def gauge(self) -> int:
        """The metric value: 0 closed, 1 half-open, 2 open."""
        return {"closed": 0, "half_open": 1, "open": 2}[self.value]


class CircuitBreaker:
    def __init__(
        self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._consecutive = 0
        self._probes = 0
        self._calls: deque[tuple[float, bool]] = deque()
        self._tickets = itertools.count(1)
        self._inflight: dict[int, float] = {}  # ticket -> start time
        self._streak_start: float | None = None  # start of the first failure in the streak
        self.opens = 0  # times this breaker opened on its own outcomes (not `trip`)

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.retry_in() == 0.0:
            return BreakerState.HALF_OPEN  # due for a probe
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker admits a probe (0 when it would now)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.settings.cooldown_s - self._clock())

    def error_rate(self) -> float:
        self._trim()
        if not self._calls:
            return 0.0
        return sum(1 for _, ok in self._calls if not ok) / len(self._calls)

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def allow(self) -> int | None:
        """A ticket when a request may go to this provider now, else None. Hand
        the ticket back with the outcome (`on_success`, `on_failure`,
        `on_neutral`); in half-open it also holds one of the probe slots."""
        if self._state is BreakerState.OPEN:
            if self.retry_in() > 0:
                return None
            self._state, self._probes = BreakerState.HALF_OPEN, 0
        if self._state is BreakerState.HALF_OPEN:
            if self._probes >= self.settings.half_open_probes:
                return None
            self._probes += 1
        ticket = next(self._tickets)
        self._inflight[ticket] = self._clock()
        return ticket

    def _started(self, ticket: int | None) -> float:
        started = self._inflight.pop(ticket, None) if ticket is not None else None
        return self._clock() if started is None else started

    def on_success(self, ticket: int | None = None) -> None:
        self._started(ticket)
        self._record(True)
        self._consecutive, self._streak_start = 0, None
        if self._state is BreakerState.HALF_OPEN:
            self._state, self._probes = BreakerState.CLOSED, 0
            self._calls.clear()

    def on_failure(self, ticket: int | None = None) -> None:
        started = self._started(ticket)
        self._record(False)
        self._consecutive += 1
        if self._streak_start is None or started < self._streak_start:
            self._streak_start = started
        if self._state is BreakerState.HALF_OPEN:
            self._open()
            return
        s = self.settings
        settled = all(t > self._streak_start for t in self._inflight.values())
        if (self._consecutive >= s.failure_threshold and settled) or (
            len(self._calls) >= s.min_calls and self.error_rate() >= s.error_rate_threshold
        ):
            self._open()

    def on_neutral(self, ticket: int | None = None) -> None:
        """An outcome that says nothing about health (client cancel, policy refusal)."""
        self._started(ticket)
        if self._state is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def trip(self, for_s: float) -> bool:
        """Open for `for_s` seconds, because another process opened this provider's
        breaker; then half-open as usual. False (nothing changes) when it is already
        open at least that long."""
        if self._state is BreakerState.OPEN and self.retry_in() >= for_s:
            return False
        self._state, self._probes = BreakerState.OPEN, 0
        self._opened_at = self._clock() + for_s - self.settings.cooldown_s
        self._streak_start = None
        return True

    def _open(self) -> None:
        self._state, self._opened_at, self._probes = BreakerState.OPEN, self._clock(), 0
        self._streak_start = None
        self.opens += 1

    def _record(self, ok: bool) -> None:
        self._calls.append((self._clock(), ok))
        self._trim()

    def _trim(self) -> None:
        horizon = self._clock() - self.settings.window_s
        while self._calls and self._calls[0][0] < horizon:
            self._calls.popleft()
