"""Leases: which process drives which prediction, until when.

A prediction is driven by whichever process holds an unexpired lease on it; a
process that dies stops renewing, and `claim_resumable` hands its work to
someone else. On PostgreSQL lease times come from the database clock (`now()`),
so replicas with skewed clocks still agree, and candidates are locked with
FOR UPDATE SKIP LOCKED so replicas claiming at once get disjoint sets.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from proxy.store.models import PREDICTION_STATUSES, TERMINAL_STATUSES, Prediction, utcnow

ACTIVE_STATUSES = tuple(s for s in PREDICTION_STATUSES if s not in TERMINAL_STATUSES)
_OWNER_MAX = 64


def _check_lease(owner: str, lease_s: float) -> None:
    if not owner or len(owner) > _OWNER_MAX:
        raise ValueError(f"lease owner must be 1..{_OWNER_MAX} characters")
    if lease_s <= 0:
        raise ValueError("lease_s must be positive")


class LeaseMixin:
    """Lease operations of `Store`; needs its session factory and `_write`."""

    _sessions: async_sessionmaker[AsyncSession]
    _pg: bool

    async def _write(self, stmt: Any) -> int:
        raise NotImplementedError

    def _now(self) -> datetime | ColumnElement[datetime]:
        return func.now() if self._pg else utcnow()

    def _until(self, lease_s: float) -> datetime | ColumnElement[datetime]:
        delta = timedelta(seconds=lease_s)
        return func.now() + delta if self._pg else utcnow() + delta

    def _claimable(
        self, now: datetime | ColumnElement[datetime], own: str | None = None
    ) -> ColumnElement[bool]:
        """Non-terminal with no live lease (or, given `own`, a lease held by `own`)."""
        expires = col(Prediction.lease_expires_at)
        free = or_(expires.is_(None), expires < now)
        if own is not None:
            free = or_(free, col(Prediction.lease_owner) == own)
        return and_(col(Prediction.status).in_(ACTIVE_STATUSES), free)

    async def claim(self, prediction_id: str, owner: str, lease_s: float) -> bool:
        """Lease one non-terminal prediction to `owner`.

        True if it was unleased, expired, or already `owner`'s (the lease is
        then extended); False if someone else holds it, it is terminal, or
        it does not exist.
        """
        _check_lease(owner, lease_s)
        now = self._now()
        stmt = (
            update(Prediction)
            .where(col(Prediction.id) == prediction_id, self._claimable(now, own=owner))
            .values(lease_owner=owner, lease_expires_at=self._until(lease_s))
        )
        return await self._write(stmt) > 0

    async def claim_resumable(
        self, owner: str, lease_s: float, limit: int, *, include_own: bool = False
    ) -> list[Prediction]:
        """Lease up to `limit` non-terminal predictions with no live lease, oldest first.

        `include_own=True` also takes rows whose live lease is already `owner`'s
        (a restarted process with a stable owner id picking up its own work).

        PostgreSQL: the candidate rows are locked with FOR UPDATE SKIP LOCKED,
        so replicas claiming at once get disjoint sets without waiting on each
        other. SQLite: one UPDATE under the database write lock.
        """
        _check_lease(owner, lease_s)
        if limit < 1:
            return []
        now = self._now()
        claimable = self._claimable(now, own=owner if include_own else None)
        candidates = (
            select(col(Prediction.id)).where(claimable).order_by(col(Prediction.id)).limit(limit)
        )
        if self._pg:
            candidates = candidates.with_for_update(skip_locked=True)
        stmt = (
            update(Prediction)
            # The condition is repeated outside the subquery so a row whose
            # lease changed under us is never taken.
            .where(col(Prediction.id).in_(candidates), claimable)
            .values(lease_owner=owner, lease_expires_at=self._until(lease_s))
            .returning(Prediction)
        )
        async with self._sessions() as session, session.begin():
            claimed = list(
                await session.scalars(stmt, execution_options={"synchronize_session": False})
            )
        return sorted(claimed, key=lambda p: p.id)

    async def renew_leases(self, owner: str, ids: Iterable[str], lease_s: float) -> int:
        """Extend `owner`'s leases on `ids`; the number still held (and extended).

        A lease that expired but was not taken by anyone is still `owner`'s and
        is renewed; one taken over by another owner is not.
        """
        _check_lease(owner, lease_s)
        id_list = list(dict.fromkeys(ids))
        if not id_list:
            return 0
        stmt = (
            update(Prediction)
            .where(col(Prediction.id).in_(id_list), col(Prediction.lease_owner) == owner)
            .values(lease_expires_at=self._until(lease_s))
        )
        return await self._write(stmt)

    async def lost_leases(self, owner: str, ids: Iterable[str]) -> list[str]:
        """Of `ids`, the active predictions another process now holds (taken over
        after `owner`'s lease lapsed): `owner` must stop driving them."""
        id_list = list(dict.fromkeys(ids))
        if not id_list:
            return []
        stmt = select(col(Prediction.id)).where(
            col(Prediction.id).in_(id_list), col(Prediction.status).in_(ACTIVE_STATUSES),
            col(Prediction.lease_owner).is_not(None), col(Prediction.lease_owner) != owner)
        async with self._sessions() as session:
            return list((await session.execute(stmt)).scalars())

    async def release(self, prediction_id: str, owner: str) -> bool:
        """Give up `owner`'s lease on one prediction. False if it was not held."""
        stmt = (
            update(Prediction)
            .where(col(Prediction.id) == prediction_id, col(Prediction.lease_owner) == owner)
            .values(lease_owner=None, lease_expires_at=None)
        )
        return await self._write(stmt) > 0
