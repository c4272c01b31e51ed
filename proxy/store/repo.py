"""The repository: every database operation the service performs.

Each method is its own short transaction and returns detached, fully loaded
objects (no lazy loads after return). Leases let several replicas share one
PostgreSQL: a prediction is driven by whichever process holds an unexpired
lease on it; a process that dies stops renewing, and `claim_resumable` hands
its work to someone else. On PostgreSQL lease times come from the database
clock (`now()`), so replicas with skewed clocks still agree.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col

from proxy.store import migrate
from proxy.store._sql import checked_fields, prediction_end, rowcount
from proxy.store._tables import ATTEMPTS, PREDICTIONS, Tx, row_values
from proxy.store.attempt_writes import AttemptWritesMixin
from proxy.store.budget import BudgetMixin, Hold
from proxy.store.db import create_engine, is_sqlite_file, sqlite_writer_engine
from proxy.store.group_commit import GroupCommit
from proxy.store.idempotency import Claim, IdempotencyHit, IdempotencyMixin, KeyHit
from proxy.store.keys import KeysMixin
from proxy.store.leases import ACTIVE_STATUSES, LeaseMixin
from proxy.store.models import (
    ATTEMPT_STATUSES,
    PREDICTION_STATUSES,
    Attempt,
    Prediction,
    WebhookDelivery,
    utcnow,
)
from proxy.store.spend import SpendMixin
from proxy.store.webhooks import WebhookMixin

# NOTIFY channel of "a prediction ended" (payload: its id), one per database.
DONE_CHANNEL = "flux_prediction_done"
_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UNSET: Any = object()


def encode_cursor(prediction_id: str) -> str:
    return base64.urlsafe_b64encode(prediction_id.encode("ascii")).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> str:
    """The id inside a cursor; ValueError if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = raw.decode("ascii")
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid cursor") from exc
    if not _ID_RE.fullmatch(value):
        raise ValueError("invalid cursor")
    return value


class Store(AttemptWritesMixin, LeaseMixin, KeysMixin, SpendMixin, BudgetMixin,
            IdempotencyMixin, WebhookMixin):
    """Async persistence for predictions and attempts (SQLite or PostgreSQL)."""

    def __init__(self, url: str, *, schema: str | None = None, echo: bool = False,
                 after_write: Callable[[str], None] | None = None) -> None:
        """`after_write(operation)` runs after each committed lifecycle write (the
        crash-point tests raise from it to stop the process between two writes)."""
        self.after_write = after_write
        self._schema = schema
        self._engine = create_engine(url, schema=schema, echo=echo)
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        self._pg = self._engine.dialect.name == "postgresql"
        # Lifecycle writes without a budget hold share transactions (group_commit.py);
        # on a SQLite file through a writer thread's own connection.
        writer = functools.partial(sqlite_writer_engine, url) if is_sqlite_file(url) else None
        self.group = GroupCommit(self._sessions, writer_engine=writer)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def safe_url(self) -> str:
        """The database URL with any password masked, for logs."""
        return self._engine.url.render_as_string(hide_password=True)

    def listen_dsn(self) -> str | None:
        """PostgreSQL: a DSN for a connection of its own that LISTENs (asyncpg's
        notation); None on SQLite, where no other process can be told."""
        if not self._pg:
            return None
        url = self._engine.url.set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    @property
    def backend(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self._engine.dialect.name

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.dispose()

    # -- lifecycle ---------------------------------------------------------

    async def upgrade(self) -> None:
        """Apply pending migrations (alembic upgrade head). Idempotent."""
        await migrate.upgrade(self._engine, schema=self._schema)

    async def dispose(self) -> None:
        await self.group.close()
        await self._engine.dispose()

    async def ping(self, timeout_s: float = 5.0) -> bool:
        try:
            async with asyncio.timeout(timeout_s), self._engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    # -- predictions -------------------------------------------------------

    async def create_prediction(self, p: Prediction, hold: Hold | None = None,
                                claim: Claim | None = None,
                                webhooks: Sequence[WebhookDelivery] = ()) -> Prediction:
        """Insert `p`; it is committed when this returns. With `hold`, the key's
        budget is reserved in the same transaction (BudgetRefused: nothing written).
        With `claim`, its idempotency key is taken in it first (IdempotencyHit: the
        key is another prediction's, nothing written). `webhooks`: its deliveries,
        inserted with it (store/webhooks.py)."""
        def op(session: Tx) -> KeyHit | None:
            if claim is not None and (hit := self._claim_key(session, claim, p.id)):
                return hit
            if hold is not None:
                self._hold(session, hold, p.id, 0)
            session.execute(insert(PREDICTIONS).values(row_values(p)))
            self._insert_deliveries(session, webhooks)
            return None

        if hit := await self._commit(op, alone=hold is not None):
            raise IdempotencyHit(hit)
        self._wrote("create_prediction")
        return p

    async def create_with_attempt(self, p: Prediction, a: Attempt, hold: Hold | None = None,
                                  attempt_hold: Hold | None = None,
                                  claim: Claim | None = None,
                                  webhooks: Sequence[WebhookDelivery] = ()) -> Prediction:
        """Admission and the first attempt's row in ONE transaction: `p` (already
        `processing`) and `a` (`submitting`) are committed together before the
        submit, with the admission hold (seq 0) and the attempt's own (seq 1)
        taken in it (BudgetRefused: nothing written), and `claim` as in
        `create_prediction`. A crash after it resumes as one after
        `begin_attempt`: the attempt is closed outcome-unknown."""
        def op(session: Tx) -> KeyHit | None:
            if claim is not None and (hit := self._claim_key(session, claim, p.id)):
                return hit
            if hold is not None:
                self._hold(session, hold, p.id, 0)
            session.execute(insert(PREDICTIONS).values(row_values(p)))
            self._insert_deliveries(session, webhooks)
            if attempt_hold is not None:
                self._hold(session, attempt_hold, p.id, a.seq)
                a.reserved_micro_usd = attempt_hold.amount_micro_usd
            self._insert_attempt(session, a)
            return None

        if hit := await self._commit(op, alone=hold is not None or attempt_hold is not None):
            raise IdempotencyHit(hit)
        self._wrote("create_with_attempt")
        return p

    async def get_prediction(self, prediction_id: str) -> Prediction | None:
        async with self._sessions() as session:
            return await session.get(Prediction, prediction_id)

    async def get_with_attempts(
        self, prediction_id: str
    ) -> tuple[Prediction, list[Attempt]] | None:
        async with self._sessions() as session, session.begin():
            prediction = await session.get(Prediction, prediction_id)
            if prediction is None:
                return None
            attempts = await session.scalars(
                select(Attempt)
                .where(col(Attempt.prediction_id) == prediction_id)
                .order_by(col(Attempt.seq))
            )
            return prediction, list(attempts)

    async def list_predictions(
        self,
        *,
        status: str | None = None,
        api_key_id: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[Prediction], str | None]:
        """Newest first. Returns (page, next_cursor); next_cursor is None at the end.

        ValueError for an invalid cursor, status or limit.
        """
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if status is not None and status not in PREDICTION_STATUSES:
            raise ValueError(f"invalid status {status!r}")
        stmt = select(Prediction)
        if status is not None:
            stmt = stmt.where(col(Prediction.status) == status)
        if api_key_id is not None:
            stmt = stmt.where(col(Prediction.api_key_id) == api_key_id)
        if cursor is not None:
            stmt = stmt.where(col(Prediction.id) < decode_cursor(cursor))
        stmt = stmt.order_by(col(Prediction.id).desc()).limit(limit + 1)
        async with self._sessions() as session:
            rows = list(await session.scalars(stmt))
        if len(rows) > limit:
            rows = rows[:limit]
            return rows, encode_cursor(rows[-1].id)
        return rows, None

    async def update_prediction(self, prediction_id: str, **fields: Any) -> bool:
        """Set columns by name; always bumps updated_at. False if no such row."""
        values = checked_fields(Prediction, fields, PREDICTION_STATUSES)
        values.setdefault("updated_at", utcnow())
        stmt = update(Prediction).where(col(Prediction.id) == prediction_id).values(**values)
        written = await self._write(stmt) > 0
        self._wrote("update_prediction")
        return written

    async def finish_prediction(
        self,
        prediction_id: str,
        *,
        status: str,
        outputs: list[str] | None = _UNSET,
        has_nsfw_contents: list[bool] | None = _UNSET,
        error: str | None = _UNSET,
        error_kind: str | None = _UNSET,
        cost_micro_usd: int = _UNSET,
        timings: dict[str, Any] | None = _UNSET,
        provider: str | None = _UNSET,
        request: dict[str, Any] = _UNSET,
        completed_at: datetime | None = None,
        holds: bool = True,
    ) -> bool:
        """Move a non-terminal prediction to terminal `status` and end its lease.

        Sets completed_at/updated_at and every keyword given. Returns False
        (changing nothing) if the prediction is missing or already terminal,
        so a late 'completed' cannot overwrite a 'canceled' and vice versa.
        `holds=False`: the caller knows no budget hold was taken for it (a key
        without a budget), so none is looked for.
        """
        given = {
            "outputs": outputs,
            "has_nsfw_contents": has_nsfw_contents,
            "error": error,
            "error_kind": error_kind,
            "cost_micro_usd": cost_micro_usd,
            "timings": timings,
            "provider": provider,
            "request": request,
            "completed_at": completed_at,
        }
        values = prediction_end(status, {k: v for k, v in given.items() if v is not _UNSET},
                                "finish_prediction")
        stmt = (
            update(Prediction)
            .where(col(Prediction.id) == prediction_id, col(Prediction.status).in_(ACTIVE_STATUSES))
            .values(**values)
        )
        def op(session: Tx) -> int:
            result = session.execute(stmt, execution_options={"synchronize_session": False})
            if holds:
                self._drop_settled_holds(session, prediction_id)
            ended = rowcount(result)
            if ended:
                self._notify_done(session, prediction_id)
            return ended

        ended = await self._commit(op)
        self._wrote("finish_prediction")
        return ended > 0

    async def finish_with_attempt(
        self, prediction_id: str, attempt_id: int, attempt: dict[str, Any], *,
        holds: bool = True, **prediction: Any
    ) -> bool:
        """The attempt's end and the prediction's end in ONE transaction, so no
        crash can leave a completed upstream job behind an unfinished prediction.

        The attempt row is always updated (its cost is real either way); the
        prediction only if still active. True when the prediction was finished here.
        """
        a_values = checked_fields(Attempt, dict(attempt), ATTEMPT_STATUSES)
        p_values = prediction_end(prediction.pop("status"), prediction, "finish_with_attempt")
        def op(session: Tx) -> int:
            session.execute(
                update(ATTEMPTS).where(ATTEMPTS.c.id == attempt_id).values(**a_values))
            result = session.execute(
                update(PREDICTIONS)
                .where(PREDICTIONS.c.id == prediction_id,
                       PREDICTIONS.c.status.in_(ACTIVE_STATUSES))
                .values(**p_values))
            if holds:  # (holds=False: none was taken, see finish_prediction)
                self._drop_settled_holds(session, prediction_id)
            ended = rowcount(result)
            if ended:
                self._notify_done(session, prediction_id)
            return ended

        ended = await self._commit(op)
        self._wrote("finish_with_attempt")
        return ended > 0

    async def request_cancel(self, prediction_id: str) -> Prediction | None:
        """Flag a non-terminal prediction for cancellation; the row as it now is.

        Terminal predictions are returned unchanged; None if there is no such id.
        """
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(Prediction)
                .where(
                    col(Prediction.id) == prediction_id,
                    col(Prediction.status).in_(ACTIVE_STATUSES),
                )
                .values(cancel_requested=True, updated_at=utcnow()),
                execution_options={"synchronize_session": False},
            )
            return await session.get(Prediction, prediction_id)

    # -- attempts ----------------------------------------------------------

    async def cancel_requested_among(self, prediction_ids: Iterable[str]) -> list[str]:
        """Which of these (active) predictions a client asked to cancel."""
        ids = list(prediction_ids)
        if not ids:
            return []
        stmt = select(col(Prediction.id)).where(
            col(Prediction.id).in_(ids),
            col(Prediction.cancel_requested).is_(True),
            col(Prediction.status).in_(ACTIVE_STATUSES),
        )
        async with self._sessions() as session:
            return list(await session.scalars(stmt))

    async def attempts_for(self, prediction_ids: Iterable[str]) -> dict[str, list[Attempt]]:
        """Attempts of many predictions in one query, each list ordered by seq.

        Every requested id is a key (with [] when it has no attempts).
        """
        ids = list(dict.fromkeys(prediction_ids))
        out: dict[str, list[Attempt]] = {pid: [] for pid in ids}
        if not ids:
            return out
        stmt = (
            select(Attempt)
            .where(col(Attempt.prediction_id).in_(ids))
            .order_by(col(Attempt.prediction_id), col(Attempt.seq))
        )
        async with self._sessions() as session:
            for attempt in await session.scalars(stmt):
                out[attempt.prediction_id].append(attempt)
        return out

    # -- helpers -----------------------------------------------------------

    def _wrote(self, operation: str) -> None:
        if self.after_write is not None:
            self.after_write(operation)

    async def _write(self, stmt: Any) -> int:
        """Run one UPDATE (group-committed); rows matched."""
        def op(session: Tx) -> int:
            result = session.execute(stmt, execution_options={"synchronize_session": False})
            return rowcount(result)

        return await self._commit(op)

    async def _commit(self, op: Callable[[Tx], Any], *, alone: bool = False) -> Any:
        """Run a write: group-committed with others, or (`alone`: it takes a budget
        hold, which locks a key's row) in its own transaction, so two replicas'
        batches never lock keys in opposite orders."""
        if not alone:
            return await self.group.run(op)
        async with self._sessions() as session, session.begin():
            return await session.run_sync(op)

    def _notify_done(self, session: Tx, prediction_id: str) -> None:
        """PostgreSQL: tell every replica's listener (lifecycle/notify.py) that the
        prediction ended; sent when this transaction commits, not before."""
        if self._pg:
            session.execute(text("SELECT pg_notify(:channel, :id)"),
                            {"channel": DONE_CHANNEL, "id": prediction_id})

    @staticmethod
    def _insert_attempt(session: Tx, a: Attempt) -> None:
        values = row_values(a)
        if a.id is None:
            del values["id"]
        result = session.execute(insert(ATTEMPTS).values(values).returning(ATTEMPTS.c.id))
        a.id = result.scalar_one()

