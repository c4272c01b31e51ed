"""Webhook deliveries in the database: inserted with their prediction, claimed under
short leases by any replica once their event has happened, and every POST recorded.

Due means: `status = waiting`, `next_attempt_at` passed, no live lease, and the
prediction's own row shows the event (`start`: no longer queued; `output` and
`completed`: terminal). So nothing needs writing when a prediction moves: the
lifecycle's writes are the outbox, and a dispatcher with nothing due only reads. An
`output` event of a prediction that ended without outputs is `skipped` by the
dispatcher that leased it (`skip_webhook`), with no POST.

Claiming: on PostgreSQL the due rows are locked FOR UPDATE SKIP LOCKED (replicas take
different rows); on SQLite writers are serialized and the UPDATE re-checks the lease,
so a row two processes both saw is leased by one. A lease outlives one POST; a
process that dies mid-POST leaves a lease that expires, and the row is sent again
(at least once: receivers dedupe on `webhook-id`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, and_, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from proxy.store._sql import rowcount
from proxy.store._tables import PREDICTIONS, Tx
from proxy.store.models import (
    TERMINAL_STATUSES,
    ApiKey,
    WebhookAttempt,
    WebhookDelivery,
    utcnow,
)

DELIVERIES: Table = WebhookDelivery.__table__  # type: ignore[attr-defined]
WEBHOOK_ATTEMPTS: Table = WebhookAttempt.__table__  # type: ignore[attr-defined]
KEYS: Table = ApiKey.__table__  # type: ignore[attr-defined]
_TERMINAL = sorted(TERMINAL_STATUSES)


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one POST came to, and what the delivery becomes."""

    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    next_status: str  # waiting (retry at next_attempt_at), delivered, failed
    next_attempt_at: datetime


def delivery_values(d: WebhookDelivery) -> dict[str, Any]:
    return {c.key: getattr(d, c.key) for c in DELIVERIES.columns}


def _due(now: datetime) -> Any:
    d, p = DELIVERIES.c, PREDICTIONS.c
    return and_(
        d.status == "waiting", d.next_attempt_at <= now,
        or_(d.lease_expires_at.is_(None), d.lease_expires_at <= now),
        or_(and_(d.event == "start", p.status != "queued"),
            and_(d.event.in_(["output", "completed"]), p.status.in_(_TERMINAL))))


class WebhookMixin:
    """`Store`'s webhook operations (the insert itself is in its creates)."""

    _sessions: async_sessionmaker[AsyncSession]
    _pg: bool

    @staticmethod
    def _insert_deliveries(session: Tx, deliveries: Sequence[WebhookDelivery]) -> None:
        if deliveries:
            session.execute(insert(DELIVERIES).values([delivery_values(d) for d in deliveries]))

    async def claim_webhooks(self, owner: str, lease_s: float, limit: int
                             ) -> list[WebhookDelivery]:
        """Lease up to `limit` due deliveries to `owner`, oldest due first."""
        now = utcnow()
        d = DELIVERIES.c
        pick = (select(d.id).select_from(DELIVERIES.join(PREDICTIONS,
                                                         PREDICTIONS.c.id == d.prediction_id))
                .where(_due(now)).order_by(d.next_attempt_at, d.id).limit(limit))
        if self._pg:
            pick = pick.with_for_update(skip_locked=True, of=DELIVERIES)
        async with self._sessions() as session, session.begin():
            ids = list((await session.execute(pick)).scalars())
            if not ids:
                return []
            rows = (await session.execute(
                update(DELIVERIES)
                .where(d.id.in_(ids), d.status == "waiting",
                       or_(d.lease_expires_at.is_(None), d.lease_expires_at <= now))
                .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s))
                .returning(*DELIVERIES.columns))).mappings().all()
        leased = [WebhookDelivery(**dict(r)) for r in rows]
        leased.sort(key=lambda w: (w.next_attempt_at, w.id))
        return leased

    async def record_webhook_attempt(self, delivery: WebhookDelivery, owner: str,
                                     result: AttemptResult) -> None:
        """The POST's row and the delivery's new state, in one transaction."""
        n = delivery.attempts + 1
        d = DELIVERIES.c
        values: dict[str, Any] = {
            "attempts": n, "status": result.next_status,
            "next_attempt_at": result.next_attempt_at,
            "last_status_code": result.status_code, "last_error": result.error,
            "lease_owner": None, "lease_expires_at": None,
            "first_attempt_at": delivery.first_attempt_at or result.started_at,
        }
        if result.next_status == "delivered":
            values["delivered_at"] = utcnow()
        async with self._sessions() as session, session.begin():
            await session.execute(insert(WEBHOOK_ATTEMPTS).values(
                delivery_id=delivery.id, n=n, started_at=result.started_at,
                duration_ms=result.duration_ms, status_code=result.status_code,
                error=result.error, instance_id=owner))
            await session.execute(update(DELIVERIES).where(d.id == delivery.id).values(values))

    async def skip_webhook(self, delivery_id: str, owner: str) -> None:
        """An `output` event whose prediction ended without outputs: never sent."""
        d = DELIVERIES.c
        async with self._sessions() as session, session.begin():
            await session.execute(update(DELIVERIES).where(
                d.id == delivery_id, d.lease_owner == owner).values(
                status="skipped", lease_owner=None, lease_expires_at=None))

    async def release_webhook_leases(self, owner: str) -> int:
        """Hand back what `owner` leased and did not finish (its stop, or its restart
        under the same instance id after a crash): sent again at once, not after the
        lease runs out."""
        d = DELIVERIES.c
        async with self._sessions() as session, session.begin():
            result = await session.execute(update(DELIVERIES).where(
                d.lease_owner == owner, d.status == "waiting").values(
                lease_owner=None, lease_expires_at=None))
            return rowcount(result)

    async def sweep_webhooks(self, created_before: datetime, limit: int = 1000) -> int:
        """Forget finished deliveries (delivered, failed, skipped) made before then,
        with their POSTs, at most `limit` at a time; how many went."""
        d = DELIVERIES.c
        old = (select(d.id).where(d.status.in_(["delivered", "failed", "skipped"]),
                                  d.created_at < created_before).limit(limit))
        async with self._sessions() as session, session.begin():
            ids = list((await session.execute(old)).scalars())
            if ids:
                await session.execute(delete(WEBHOOK_ATTEMPTS).where(
                    WEBHOOK_ATTEMPTS.c.delivery_id.in_(ids)))
                await session.execute(delete(DELIVERIES).where(d.id.in_(ids)))
        return len(ids)

    async def list_webhooks(self, *, prediction_id: str | None = None,
                            status: str | None = None, limit: int = 50,
                            before: str | None = None) -> list[WebhookDelivery]:
        """Newest first (ids are time-ordered); `before`: an id, for the next page."""
        d = DELIVERIES.c
        stmt = select(DELIVERIES).order_by(d.id.desc()).limit(limit)
        if prediction_id is not None:
            stmt = stmt.where(d.prediction_id == prediction_id)
        if status is not None:
            stmt = stmt.where(d.status == status)
        if before is not None:
            stmt = stmt.where(d.id < before)
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).mappings().all()
        return [WebhookDelivery(**dict(r)) for r in rows]

    async def get_webhook(self, delivery_id: str) -> WebhookDelivery | None:
        async with self._sessions() as session:
            row = (await session.execute(
                select(DELIVERIES).where(DELIVERIES.c.id == delivery_id))).mappings().first()
        return None if row is None else WebhookDelivery(**dict(row))

    async def webhook_attempts(self, delivery_ids: Iterable[str]
                               ) -> dict[str, list[WebhookAttempt]]:
        ids = list(delivery_ids)
        out: dict[str, list[WebhookAttempt]] = defaultdict(list)
        if not ids:
            return out
        a = WEBHOOK_ATTEMPTS.c
        async with self._sessions() as session:
            rows = (await session.execute(select(WEBHOOK_ATTEMPTS).where(
                a.delivery_id.in_(ids)).order_by(a.delivery_id, a.n))).mappings().all()
        for r in rows:
            out[r["delivery_id"]].append(WebhookAttempt(**dict(r)))
        return out

    async def redeliver_webhook(self, delivery_id: str) -> bool:
        """Send it again now, whatever it came to, with a fresh retry window (same id,
        so a receiver that has it can tell). False when there is no such delivery."""
        d = DELIVERIES.c
        async with self._sessions() as session, session.begin():
            result = await session.execute(update(DELIVERIES).where(d.id == delivery_id).values(
                status="waiting", next_attempt_at=utcnow(), first_attempt_at=None,
                lease_owner=None, lease_expires_at=None))
            return rowcount(result) > 0

    async def set_webhook_secret(self, key_id: str, secret: str | None, previous: str | None,
                                 previous_until: datetime | None) -> bool:
        async with self._sessions() as session, session.begin():
            result = await session.execute(update(KEYS).where(KEYS.c.id == key_id).values(
                webhook_secret=secret, webhook_secret_prev=previous,
                webhook_secret_prev_until=previous_until))
            return rowcount(result) > 0
