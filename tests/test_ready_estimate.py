"""The learned first-poll time settles near the jobs' real duration and does not
ratchet upward on its own waits (a quantile of attempt latencies would)."""

from __future__ import annotations

import random

from proxy.routing.ready import MIN_SAMPLES, ReadyEstimate


def simulate(estimate: ReadyEstimate, durations: list[float], interval: float = 0.25
             ) -> list[float]:
    """Poll each job first at the estimate (else `interval`), then every `interval`;
    feed what the polls saw. Returns the estimate after each job."""
    seen = []
    for duration in durations:
        first = estimate.value() or interval
        t, running_at = first, None
        while t < duration:  # polls that still see it running
            running_at = t
            t += interval
        estimate.observe(running_at_s=running_at,
                         done_at_first_poll_s=first if running_at is None else None)
        seen.append(estimate.value() or 0.0)
    return seen


def test_nothing_is_learned_before_enough_jobs() -> None:
    estimate = ReadyEstimate()
    simulate(estimate, [1.0] * (MIN_SAMPLES - 1))
    assert estimate.value() is None


def test_settles_below_the_duration_and_stays_there() -> None:
    rng = random.Random(1)
    durations = [rng.uniform(10.0, 30.0) for _ in range(600)]
    seen = simulate(ReadyEstimate(), durations, interval=2.0)
    late = seen[300:]
    # The fastest jobs take ~10 s: the first poll comes a little before that, and it
    # does not creep up job after job.
    assert all(7.0 <= v <= 12.0 for v in late)
    assert max(late) - min(late) < 3.0


def test_walks_down_when_jobs_get_faster() -> None:
    estimate = ReadyEstimate()
    simulate(estimate, [5.0] * 200)
    before = estimate.value()
    assert before is not None and 4.0 <= before <= 5.0
    simulate(estimate, [1.0] * 200)
    after = estimate.value()
    assert after is not None and after <= 1.0
