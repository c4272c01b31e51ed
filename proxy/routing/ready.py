"""When a job on an upstream that gives no estimate of its own can first be done.

Learned from what the polls saw, not from attempt latencies: a latency includes our
own wait before the first poll, so a quantile of latencies only ever grows (each
job "takes" at least as long as we waited). Here a job seen still processing t
seconds after its submit lasted more than t (a lower bound, kept as is); a job
already done at its first poll, t after the submit, lasted at most t, so the sample
is a little below t and the estimate walks down until polls see jobs running again.
"""

from __future__ import annotations

from collections import deque

from proxy.routing.health import percentile

MIN_SAMPLES = 20  # observed jobs before the estimate is used
WINDOW = 200  # the most recent jobs it is learned from
SHRINK = 0.8  # a job done at the first poll: it may have been done this much earlier
QUANTILE = 10  # percent: the first poll waits until this share of jobs can be done


class ReadyEstimate:
    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=WINDOW)

    def observe(self, *, running_at_s: float | None, done_at_first_poll_s: float | None
                ) -> None:
        """`running_at_s`: the latest time after the submit a poll saw the job still
        running; else `done_at_first_poll_s`: when the first poll found it done."""
        if running_at_s is not None:
            self._samples.append(running_at_s)
        elif done_at_first_poll_s is not None:
            self._samples.append(done_at_first_poll_s * SHRINK)

    def value(self) -> float | None:
        """Seconds after the submit before which no poll is worth making; None until
        MIN_SAMPLES jobs were seen."""
        if len(self._samples) < MIN_SAMPLES:
            return None
        return percentile(list(self._samples), QUANTILE)
