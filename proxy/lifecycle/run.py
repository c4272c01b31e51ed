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


def _wake(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class Signal:
    """A one-shot flag, like asyncio.Event (is_set, set, clear, wait) but with no
    deque until someone waits, and `sleep`: a wait bounded by a timer (one future
    and one timer handle, where `wait_for(event.wait())` makes a Task, a coroutine
    and a timeout context per sleep). One is held per prediction in flight."""

    __slots__ = ("_flag", "_waiters")

    def __init__(self) -> None:
        self._flag = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(True)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> bool:
        if self._flag:
            return True
        fut = self._waiter()
        try:
            return await fut
        finally:
            self._forget(fut)

    async def sleep(self, seconds: float) -> bool:
        """Wait `seconds`, or less when the flag is set: True when it was."""
        if self._flag:
            return True
        fut = self._waiter()
        handle = fut.get_loop().call_later(seconds, _wake, fut)
        try:
            return await fut
        finally:
            handle.cancel()
            self._forget(fut)

    def _waiter(self) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [fut]
        else:
            self._waiters.append(fut)
        return fut

    def _forget(self, fut: asyncio.Future[bool]) -> None:
        waiters = self._waiters
        if waiters is not None and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                self._waiters = None


class CancelSignal(Signal):
    """Stops one attempt; `reason` goes on its row."""

    __slots__ = ("reason",)

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
    done: Signal = field(default_factory=Signal)
    cancel: CancelSignal = field(default_factory=CancelSignal)
    task: asyncio.Task[None] | None = None
    key: ApiKey | None = None  # the client key that asked (None: admin or auth off)
    # A completed attempt's row is written together with the prediction's end (one
    # transaction), so it waits here: attempt id -> its final fields.
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)
    closed: bool = False  # the prediction's end was written: write attempts at once
    # Admitted at submit, its attempt row written with the prediction's (one
    # transaction): the runner submits to it first instead of routing again.
    # A budget hold may exist for it (one was taken here, or it was adopted): its end
    # looks for holds to drop. False spares a statement per write.
    holds: bool = False
    admitted: Admitted | None = None
    admitted_hold: Hold | None = None
    delivered: Attempt | None = None  # the attempt whose images the client got
    wasted: set[int] = field(default_factory=set)  # attempt ids counted as wasted cost
    # A repeat of an earlier request (same Idempotency-Key): a view, not driven by it.
    replayed: bool = False
    # Its driver stopped because the database was unreachable: resume it when it is back.
    store_lost: bool = False
    # It has webhook deliveries waiting on its end (a resumed run may: assume so), so
    # its end nudges the dispatcher; the others spare it a database round trip each.
    webhooks: bool = True
    # (step, total) of the running attempt, where its upstream reports it; memory only.
    progress: tuple[int, int] | None = None

    def set_progress(self, progress: tuple[int, int]) -> None:
        self.progress = progress


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
