"""Spend: totals over attempt rows, grouped by key, provider, model or day.

Every figure is a SUM/COUNT over `attempts` (joined to `predictions` for the
model), so totals always equal the sum of attempt rows exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, case, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from proxy.store.models import Attempt, Prediction

GroupBy = Literal["key", "provider", "model", "day"]
FAILED_ATTEMPT_STATUSES = ("failed", "unknown")


@dataclass(frozen=True, slots=True)
class SpendRow:
    group: str | None
    cost_micro_usd: int
    images: int
    predictions: int
    attempts: int
    failed_attempts: int


class SpendMixin:
    _sessions: async_sessionmaker[AsyncSession]
    _pg: bool

    def _day(self) -> ColumnElement[Any]:
        if self._pg:  # calendar days in UTC, whatever the session's time zone
            return func.to_char(func.timezone("UTC", col(Attempt.created_at)), "YYYY-MM-DD")
        return func.date(col(Attempt.created_at))  # SQLite stores naive UTC

    async def spend(
        self,
        group_by: GroupBy | None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        api_key_id: str | None = None,
    ) -> list[SpendRow]:
        """Totals per group over attempts created in [since, until); one row with
        group None when `group_by` is None (a prediction counts once there even if
        its attempts span several groups)."""
        group: Any = {
            "key": col(Attempt.api_key_id),
            "provider": col(Attempt.provider),
            "model": col(Prediction.model),
            "day": self._day(),
            None: literal(None),
        }[group_by]
        failed = case((col(Attempt.status).in_(FAILED_ATTEMPT_STATUSES), 1), else_=0)
        stmt = (
            select(
                group.label("g"),
                func.coalesce(func.sum(col(Attempt.cost_micro_usd)), 0),
                func.coalesce(func.sum(col(Attempt.images)), 0),
                func.count(func.distinct(col(Attempt.prediction_id))),
                func.count(col(Attempt.id)),
                func.coalesce(func.sum(failed), 0),
            )
            .select_from(Attempt)
        )
        if group_by is not None:
            stmt = stmt.group_by(group).order_by(group)
        if group_by == "model":
            stmt = stmt.join(Prediction, col(Prediction.id) == col(Attempt.prediction_id))
        if since is not None:
            stmt = stmt.where(col(Attempt.created_at) >= since)
        if until is not None:
            stmt = stmt.where(col(Attempt.created_at) < until)
        if api_key_id is not None:
            stmt = stmt.where(col(Attempt.api_key_id) == api_key_id)
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).all()
        return [SpendRow(None if g is None else str(g), int(c), int(i), int(p), int(a), int(f))
                for g, c, i, p, a, f in rows]

    async def spent_since(self, api_key_id: str, since: datetime) -> int:
        """Micro-USD recorded on this key's attempts since `since` (budgets)."""
        stmt = select(func.coalesce(func.sum(col(Attempt.cost_micro_usd)), 0)).where(
            col(Attempt.api_key_id) == api_key_id, col(Attempt.created_at) >= since)
        async with self._sessions() as session:
            return int((await session.execute(stmt)).scalar_one())
