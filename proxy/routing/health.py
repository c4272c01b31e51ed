"""What this process knows of each provider's health: breaker, 429 cooldown, latency.

With Redis (routing/sharing.py), what one process learns that keeps a provider
out of traffic is shared: `share` hears of each breaker open and each 429
cooldown here, and `apply_shared` brings in those of the other processes."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from providers.base import ErrorKind
from proxy import metrics
from proxy.routing.breaker import BreakerSettings, BreakerState, CircuitBreaker

# Failures that say the provider is unhealthy. Rate limits have their own cooldown;
# policy refusals and invalid input are the request's fault, not the provider's.
UNHEALTHY = frozenset({
    ErrorKind.UNAVAILABLE,
    ErrorKind.TIMEOUT,
    ErrorKind.OUTCOME_UNKNOWN,
    ErrorKind.MALFORMED,
    ErrorKind.AUTH,
})


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


class ProviderHealth:
    def __init__(
        self,
        name: str,
        breaker: BreakerSettings,
        *,
        ewma_alpha: float = 0.2,
        default_retry_after_s: float = 1.0,
        samples: int = 200,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.breaker = CircuitBreaker(breaker, clock)
        self._clock = clock
        self._alpha = ewma_alpha
        self._default_retry_after = default_retry_after_s
        self._limited_until = 0.0
        self.latency_ewma_s: float | None = None
        self._latencies: deque[float] = deque(maxlen=samples)
        # Told (provider, "open" | "rate_limited", seconds) when this process opens the
        # breaker or gets a 429 (routing/sharing.py shares it); None: nobody listens.
        self.share: Callable[[str, str, float], None] | None = None
        self._gauge = metrics.BREAKER_STATE.labels(name)
        self._published: float | None = None
        self._publish()

    def rate_limited_for(self) -> float:
        return max(0.0, self._limited_until - self._clock())

    def available_in(self) -> float:
        """Seconds until this provider could take a request (0: now)."""
        return max(self.rate_limited_for(), self.breaker.retry_in())

    def acquire(self) -> int | None:
        """A ticket for one attempt now (give it back to `record`), or None."""
        if self.rate_limited_for() > 0:
            return None
        ticket = self.breaker.allow()
        self._publish()
        return ticket

    def record(self, kind: ErrorKind | None, *, ok: bool, latency_s: float | None = None,
               retry_after_s: float | None = None, ticket: int | None = None) -> None:
        """Feed one finished attempt back: `ok` for a completed job, else its kind."""
        opens = self.breaker.opens
        if ok:
            self.breaker.on_success(ticket)
            if latency_s is not None:
                self._latencies.append(latency_s)
                self.latency_ewma_s = (
                    latency_s if self.latency_ewma_s is None
                    else self._alpha * latency_s + (1 - self._alpha) * self.latency_ewma_s
                )
        elif kind is ErrorKind.RATE_LIMITED:
            wait = retry_after_s if retry_after_s is not None else self._default_retry_after
            self._limited_until = max(self._limited_until, self._clock() + wait)
            self.breaker.on_neutral(ticket)
            if self.share is not None:
                self.share(self.name, "rate_limited", wait)
        elif kind in UNHEALTHY:
            self.breaker.on_failure(ticket)
        else:
            self.breaker.on_neutral(ticket)
        if self.breaker.opens != opens and self.share is not None:
            self.share(self.name, "open", self.breaker.settings.cooldown_s)
        self._publish()

    def apply_shared(self, *, open_for: float | None = None,
                     limited_for: float | None = None) -> None:
        """What another process found: the breaker opened there (`open_for` seconds
        of its cooldown left), or a 429 cooldown (`limited_for` seconds left)."""
        if open_for is not None and open_for > 0:
            self.breaker.trip(open_for)
        if limited_for is not None and limited_for > 0:
            self._limited_until = max(self._limited_until, self._clock() + limited_for)
        self._publish()

    def latency_percentile(self, pct: float, min_samples: int) -> float | None:
        if len(self._latencies) < min_samples:
            return None
        return percentile(list(self._latencies), pct)

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.breaker.state.value,
            "consecutive_failures": self.breaker.consecutive_failures,
            "error_rate": round(self.breaker.error_rate(), 3),
            "retry_in_s": round(self.breaker.retry_in(), 3),
            "rate_limited_for_s": round(self.rate_limited_for(), 3),
            "latency_ewma_ms": None if self.latency_ewma_s is None
            else round(self.latency_ewma_s * 1000),
        }

    def _publish(self) -> None:
        state: BreakerState = self.breaker.state
        if state.gauge != self._published:  # every attempt calls this: set on change only
            self._published = state.gauge
            self._gauge.set(state.gauge)
