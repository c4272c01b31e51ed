"""Simulated upstream jobs: what was asked, when it finishes, how it ends.

A job progresses by the clock alone: it is queued for the first fifth of its latency,
then running, and terminal once `now >= done_at`. No background task moves it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

Phase = Literal["queued", "running", "done"]

# WaveSpeed `data.code` of a failed task (known behaviour beyond the seed).
CODE_MODERATION = 1200
CODE_BAD_PARAMETER = 1400
CODE_PARAMETER_VALIDATION = 1401
CODE_MEDIA_ACCESS = 1402
CODE_INTERNAL = 5000
CODE_UNAVAILABLE = 5003
CODE_SYNC_TIMEOUT = 5004


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated submit, in the simulator's own terms (both wires map onto it)."""

    prompt: str
    width: int
    height: int
    num_images: int
    seed: int  # -1: the simulator draws one
    output_format: str
    safety_checker: bool = True
    base64_output: bool = False
    sync: bool = False


@dataclass(frozen=True, slots=True)
class Failure:
    """How a failing job ends: terminal status and WaveSpeed-style code (None: no code)."""

    code: int | None = CODE_INTERNAL
    status: str = "failed"

    @property
    def policy(self) -> bool:
        return self.code == CODE_MODERATION


@dataclass(slots=True)
class Job:
    id: str
    spec: JobSpec
    seed: int
    created_at: float  # wall clock, for timestamps
    started: float  # monotonic, for progress
    latency_s: float
    failure: Failure | None = None
    nsfw: tuple[bool, ...] = ()
    poll_5xx_left: int = 0
    poll_malformed_left: int = 0

    @property
    def done_at(self) -> float:
        return self.started + self.latency_s

    def phase(self, now: float) -> Phase:
        if now >= self.done_at:
            return "done"
        if now - self.started < self.latency_s * 0.2:
            return "queued"
        return "running"

    def remaining(self, now: float) -> float:
        return max(0.0, self.done_at - now)

    def succeeded(self, now: float) -> bool:
        return self.failure is None and now >= self.done_at

    @property
    def created_iso(self) -> str:
        return iso_ms(self.created_at)

    @property
    def completed_iso(self) -> str:
        return iso_ms(self.created_at + self.latency_s)


class JobStore:
    """Jobs by id, bounded: the oldest are evicted past `max_jobs`."""

    def __init__(self, max_jobs: int) -> None:
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > max(1, self.max_jobs):
            self._jobs.popitem(last=False)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def clear(self) -> None:
        self._jobs.clear()

    def __len__(self) -> int:
        return len(self._jobs)


@dataclass(slots=True)
class Stats:
    """Request counters. Every request on a route counts, faulted ones too."""

    submits: int = 0
    polls: int = 0
    asset_gets: int = 0
    jobs: int = 0  # jobs accepted since the last reset

    def as_dict(self) -> dict[str, int]:
        return {
            "submits": self.submits,
            "polls": self.polls,
            "asset_gets": self.asset_gets,
            "jobs": self.jobs,
        }


def iso_ms(ts: float) -> str:
    """`2025-01-15T12:00:00.000Z`, the timestamp shape both seeds show."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
