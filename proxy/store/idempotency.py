"""Idempotency keys in the database: a client's `Idempotency-Key` and the prediction
it made, so a repeat (on any replica, after a restart) answers that prediction.

The key's row is claimed in the transaction that inserts the prediction
(`Store.create_prediction` / `create_with_attempt` with a `Claim`), before any budget
hold, so a crash never leaves one without the other and a refused duplicate holds
nothing. Claiming is an INSERT ... ON CONFLICT DO NOTHING: on PostgreSQL a second
claim of a key whose first is not yet committed waits for that commit, then finds
its row; on SQLite writers are serialized. An expired row is deleted first, in the
same transaction, so its key is free again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import async_sessionmaker

from proxy.store._sql import rowcount
from proxy.store._tables import Tx
from proxy.store.models import IdempotencyKey, utcnow

KEYS: Table = IdempotencyKey.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Claim:
    """The key a new prediction claims."""

    scope: str  # the client key's id, "" for admin / auth off
    key: str
    request_hash: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class KeyHit:
    """A live row for a claimed key: what it made, and from what request."""

    prediction_id: str
    request_hash: str


class IdempotencyHit(Exception):
    """The key is taken (and not expired): nothing was written."""

    def __init__(self, hit: KeyHit) -> None:
        super().__init__(f"idempotency key already used for prediction {hit.prediction_id}")
        self.hit = hit


class IdempotencyMixin:
    """`Store`'s idempotency-key operations (the claim itself is in its creates)."""

    _sessions: async_sessionmaker[Any]
    _pg: bool

    async def find_idempotency(self, scope: str, key: str) -> KeyHit | None:
        """The unexpired row for (scope, key), if any."""
        stmt = select(KEYS.c.prediction_id, KEYS.c.request_hash).where(
            KEYS.c.api_key_id == scope, KEYS.c.key == key, KEYS.c.expires_at > utcnow())
        async with self._sessions() as session:
            row = (await session.execute(stmt)).first()
        return None if row is None else KeyHit(row[0], row[1])

    async def sweep_idempotency(self, expired_before: datetime) -> int:
        """Delete the rows that expired before then; how many."""
        async with self._sessions() as session, session.begin():
            result = await session.execute(delete(KEYS).where(KEYS.c.expires_at <= expired_before))
            return rowcount(result)

    def _claim_key(self, session: Tx, claim: Claim, prediction_id: str) -> KeyHit | None:
        """Claim the key for `prediction_id` in the caller's transaction; the row that
        holds it instead (nothing written), or None when claimed."""
        now = utcnow()
        session.execute(delete(KEYS).where(KEYS.c.api_key_id == claim.scope,
                                           KEYS.c.key == claim.key, KEYS.c.expires_at <= now))
        insert = (postgresql if self._pg else sqlite).insert
        stmt = insert(KEYS).values(
            api_key_id=claim.scope, key=claim.key, request_hash=claim.request_hash,
            prediction_id=prediction_id, created_at=now, expires_at=claim.expires_at,
        ).on_conflict_do_nothing(index_elements=["api_key_id", "key"])
        if rowcount(session.execute(stmt)) == 1:
            return None
        row = session.execute(select(KEYS.c.prediction_id, KEYS.c.request_hash).where(
            KEYS.c.api_key_id == claim.scope, KEYS.c.key == claim.key)).first()
        # No row after a conflict: a sweep deleted it in between. Its prediction is
        # still what the key made; "" says it cannot be told (the service answers 409).
        return KeyHit(row[0], row[1]) if row is not None else KeyHit("", claim.request_hash)
