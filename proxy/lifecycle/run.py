"""What the lifecycle keeps in memory for one prediction it is driving."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from providers.base import ErrorKind
from proxy.routing.admission import Admitted
from proxy.store.budget import Hold
from proxy.store.models import ApiKey, Attempt, Prediction


class CancelSignal(asyncio.Event):
    """Stops one attempt; `reason` goes on its row."""

    def __init__(self, reason: str = "canceled by client") -> None:
        super().__init__()
        self.reason = reason

    def fire(self, reason: str) -> None:
        self.reason = reason
        self.set()


@dataclass(slots=True)
class Run:
    """A prediction this process is driving, mirrored in memory so sync-mode
    answers need no re-read."""

    pred: Prediction
    attempts: list[Attempt]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: CancelSignal = field(default_factory=CancelSignal)
    task: asyncio.Task[None] | None = None
    key: ApiKey | None = None  # the client key that asked (None: admin or auth off)
    # A completed attempt's row is written together with the prediction's end (one
    # transaction), so it waits here: attempt id -> its final fields.
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)
    closed: bool = False  # the prediction's end was written: write attempts at once
    # Admitted at submit, its attempt row written with the prediction's (one
    # transaction): the runner submits to it first instead of routing again.
    admitted: Admitted | None = None
    admitted_hold: Hold | None = None


@dataclass(slots=True)
class Outcome:
    ok: bool
    provider: str | None = None
    outputs: list[str] = field(default_factory=list)
    nsfw: list[bool] = field(default_factory=list)
    inference_ms: int | None = None
    error: str | None = None
    kind: ErrorKind | None = None
    attempt: Attempt | None = None  # the attempt this outcome is of
    final: bool = False  # no other provider may be tried (the images were paid for)

    @property
    def retryable(self) -> bool:
        return not self.final and (self.kind is None or self.kind.retryable)


def ms(delta: timedelta) -> int:
    return max(0, int(delta.total_seconds() * 1000))
