"""The time the lifecycle reads: wall-clock datetimes and a monotonic counter.

Everything that schedules or measures (deadlines, backoff stops, breaker
cooldowns, latencies) asks a `Clock` instead of the `datetime`/`time` modules,
so tests can run it on virtual time (`providers.testing.FakeClock`).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Timezone-aware UTC now."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals only)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()
