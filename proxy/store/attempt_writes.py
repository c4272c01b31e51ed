"""Attempt writes: the rows an upstream attempt goes through (written before
its submit, accepted, ended), each with its budget hold in the same transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import update
from sqlmodel import col

from proxy.store._sql import checked_fields, rowcount
from proxy.store._tables import ATTEMPTS, Tx
from proxy.store.budget import BudgetMixin, Hold
from proxy.store.leases import ACTIVE_STATUSES
from proxy.store.models import ATTEMPT_STATUSES, Attempt, Prediction, utcnow


class AttemptWritesMixin(BudgetMixin):
    """Attempt operations of `Store`; needs its `_write` and `_wrote`."""

    async def _write(self, stmt: Any) -> int:
        raise NotImplementedError

    def _wrote(self, operation: str) -> None:
        raise NotImplementedError

    async def _commit(self, op: Callable[[Tx], Any], *, alone: bool = False) -> Any:
        raise NotImplementedError

    @staticmethod
    def _insert_attempt(session: Tx, a: Attempt) -> None:
        raise NotImplementedError

    async def add_attempt(self, a: Attempt) -> Attempt:
        """Insert `a`; returned (the same object) with its id set."""
        async with self._sessions() as session:
            session.add(a)
            await session.commit()
        self._wrote("add_attempt")
        return a

    async def begin_attempt(self, a: Attempt, hold: Hold | None = None) -> bool:
        """Insert `a` only while its prediction is active and no cancel was asked
        for, atomically: the row lock taken here orders it against
        `request_cancel`, so a cancel that has returned is never followed by a
        new upstream submit. False (nothing written) when it may not start.
        With `hold`, the attempt's budget hold is taken in the same transaction
        (BudgetRefused: nothing written)."""
        def op(session: Tx) -> bool:
            result = session.execute(
                update(Prediction)
                .where(col(Prediction.id) == a.prediction_id,
                       col(Prediction.status).in_(ACTIVE_STATUSES),
                       col(Prediction.cancel_requested).is_(False))
                .values(updated_at=utcnow()),
                execution_options={"synchronize_session": False})
            if rowcount(result) == 0:
                return False
            if hold is not None:
                self._hold(session, hold, a.prediction_id, a.seq)
                a.reserved_micro_usd = hold.amount_micro_usd
            self._insert_attempt(session, a)
            return True

        if not await self._commit(op, alone=hold is not None):
            return False
        self._wrote("begin_attempt")
        return True

    async def update_attempt(self, attempt_id: int, **fields: Any) -> bool:
        """Set columns by name. False if no such row."""
        values = checked_fields(Attempt, fields, ATTEMPT_STATUSES)
        stmt = update(Attempt).where(col(Attempt.id) == attempt_id).values(**values)
        written = await self._write(stmt) > 0
        self._wrote("update_attempt")
        return written

    async def accept_attempt(self, attempt: Attempt, *, raise_hold_to: int | None = None,
                             **fields: Any) -> None:
        """The upstream accepted the attempt: its id (and, when it quoted above what
        was held, the hold raised to the quote), in one transaction."""
        def op(session: Tx) -> None:
            _set(session, attempt, fields)
            if raise_hold_to is not None:
                self._raise_hold(session, attempt.prediction_id, attempt.seq,
                                       raise_hold_to)

        await self._commit(op)
        self._wrote("update_attempt")

    async def end_attempt(self, attempt: Attempt, *, holds: bool = True, **fields: Any) -> None:
        """Record an attempt's end (its cost) and drop its budget hold, atomically
        (`holds=False`: none was taken)."""
        def op(session: Tx) -> None:
            _set(session, attempt, fields)
            if holds:
                self._drop_hold(session, attempt.prediction_id, attempt.seq)

        await self._commit(op)
        self._wrote("update_attempt")


def _set(session: Tx, attempt: Attempt, fields: dict[str, Any]) -> None:
    values = checked_fields(Attempt, fields, ATTEMPT_STATUSES)
    assert attempt.id is not None
    session.execute(update(ATTEMPTS).where(ATTEMPTS.c.id == attempt.id).values(**values))
