"""Budget holds in the database: what each key may still spend, across replicas,
restarts and crashes.

A key's exposure is its spend this period (the cost on its attempt rows) plus
its holds (rows of `budget_reservations`). A hold is taken in the same
transaction that admits the prediction (seq 0) or writes an attempt's row just
before its submit (seq n, replacing seq 0), after locking the key's row so
concurrent reservers queue; it is dropped in the transaction that records the
attempt's cost, and any left at the prediction's end go with that write.

So the only overshoot possible is an attempt that costs more than it held
(an upstream quoting above the expected price): the sum, over attempts already
submitted, of max(0, cost - reserved_micro_usd).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from proxy.store._tables import ATTEMPTS, RESERVATIONS, Tx
from proxy.store.models import ApiKey, Attempt, Prediction, Reservation, utcnow

_RUNNING = ("submitting", "processing")


@dataclass(frozen=True, slots=True)
class Hold:
    """Reserve `amount_micro_usd` against a key whose budget is `budget_micro_usd`
    for the period that began at `since`."""

    api_key_id: str
    budget_micro_usd: int
    since: datetime
    amount_micro_usd: int


class BudgetRefused(Exception):
    """The hold would take the key past its budget; nothing was written."""

    def __init__(self, spent: int, reserved: int, amount: int) -> None:
        super().__init__(f"spent {spent} + reserved {reserved} + {amount} exceeds the budget")
        self.spent, self.reserved, self.amount = spent, reserved, amount


class BudgetMixin:
    """Budget operations of `Store`."""

    _sessions: async_sessionmaker[AsyncSession]
    _pg: bool

    def _hold(self, session: Tx, hold: Hold, prediction_id: str, seq: int
                    ) -> None:
        """Inside the caller's transaction: check and take the hold, or raise."""
        key = col(ApiKey.id) == hold.api_key_id
        if self._pg:  # reservers of one key queue here
            session.execute(select(col(ApiKey.id)).where(key).with_for_update())
        else:  # a write first: SQLite's lock is held from here to the commit
            session.execute(update(ApiKey).where(key).values(
                budget_period=ApiKey.budget_period), execution_options={
                "synchronize_session": False})
        spent, reserved = self._exposure(session, hold.api_key_id, hold.since,
                                               replacing=(prediction_id, 0) if seq else None)
        if spent + reserved + hold.amount_micro_usd > hold.budget_micro_usd:
            raise BudgetRefused(spent, reserved, hold.amount_micro_usd)
        if seq:  # the attempt's own hold replaces the one taken at admission
            session.execute(delete(Reservation).where(
                col(Reservation.prediction_id) == prediction_id, col(Reservation.seq) == 0))
        session.execute(insert(RESERVATIONS).values(
            prediction_id=prediction_id, seq=seq, api_key_id=hold.api_key_id,
            amount_micro_usd=hold.amount_micro_usd, created_at=utcnow()))

    @staticmethod
    def _exposure(session: Tx, api_key_id: str, since: datetime,
                        replacing: tuple[str, int] | None = None) -> tuple[int, int]:
        spent_q = select(func.coalesce(func.sum(col(Attempt.cost_micro_usd)), 0)).where(
            col(Attempt.api_key_id) == api_key_id, col(Attempt.created_at) >= since)
        held_q = select(func.coalesce(func.sum(col(Reservation.amount_micro_usd)), 0)).where(
            col(Reservation.api_key_id) == api_key_id)
        if replacing is not None:
            held_q = held_q.where(~and_(col(Reservation.prediction_id) == replacing[0],
                                        col(Reservation.seq) == replacing[1]))
        spent = int((session.execute(spent_q)).scalar_one())
        held = int((session.execute(held_q)).scalar_one())
        return spent, held

    @staticmethod
    def _raise_hold(session: Tx, prediction_id: str, seq: int,
                          amount: int) -> None:
        session.execute(update(Reservation).where(
            col(Reservation.prediction_id) == prediction_id, col(Reservation.seq) == seq,
            col(Reservation.amount_micro_usd) < amount).values(amount_micro_usd=amount),
            execution_options={"synchronize_session": False})

    @staticmethod
    def _drop_hold(session: Tx, prediction_id: str, seq: int) -> None:
        session.execute(delete(RESERVATIONS).where(
            RESERVATIONS.c.prediction_id == prediction_id, RESERVATIONS.c.seq == seq))

    @staticmethod
    def _drop_settled_holds(session: Tx, prediction_id: str) -> None:
        """At the prediction's end: the admission hold and those of ended attempts
        (a hedge loser still running keeps its own until it settles)."""
        running = select(ATTEMPTS.c.seq).where(
            ATTEMPTS.c.prediction_id == prediction_id, ATTEMPTS.c.status.in_(_RUNNING))
        session.execute(delete(RESERVATIONS).where(
            RESERVATIONS.c.prediction_id == prediction_id,
            or_(RESERVATIONS.c.seq == 0, RESERVATIONS.c.seq.not_in(running))))

    async def exposure(self, api_key_id: str, since: datetime) -> tuple[int, int]:
        """(spent since `since`, held now) for one key."""
        async with self._sessions() as session:
            return await session.run_sync(self._exposure, api_key_id, since)

    async def release_stale_holds(self, finished_before: datetime) -> int:
        """Holds of predictions that ended before `finished_before` (a hedge loser
        whose process died before it settled): they hold nothing real any more."""
        # From the (small) holds table outward, by primary key: never a scan of predictions.
        ended = select(col(Prediction.id)).where(
            col(Prediction.id).in_(select(col(Reservation.prediction_id))),
            col(Prediction.completed_at).is_not(None),
            col(Prediction.completed_at) < finished_before)
        async with self._sessions() as session, session.begin():
            result: Any = await session.execute(
                delete(Reservation).where(col(Reservation.prediction_id).in_(ended)))
            return int(result.rowcount or 0)
