"""An in-memory `Store` for in-process tests: the same operations, conditions,
return values and `after_write` points as the SQL store, with no thread and no
I/O, so virtual-time tests (looptime) need no synchronisation with a database.

Rows are dicts held as the database holds them, and reads build fresh objects
(_memory_rows.py). Each method does all its checks before its first change, so
one that raises (BudgetRefused, IntegrityError, ValueError) has written nothing,
like a rolled-back transaction; none awaits between its reads and its writes,
so each is atomic against the loop's other tasks.

Not here: `spend` (reports), migrations, `engine`, webhook deliveries (the creates
take them and drop them: no dispatcher runs on this store). The SQL store is the truth;
tests/test_memory_store.py runs one set of assertions against both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from proxy.store._memory_idempotency import MemoryIdempotencyMixin
from proxy.store._memory_keys import MemoryKeysMixin
from proxy.store._memory_rows import ATTEMPTS, PREDICTIONS, Row, integrity_error, turn, utc
from proxy.store._sql import checked_fields, prediction_end
from proxy.store.budget import _RUNNING, BudgetRefused, Hold
from proxy.store.idempotency import Claim
from proxy.store.leases import ACTIVE_STATUSES, _check_lease
from proxy.store.models import (
    ATTEMPT_STATUSES,
    PREDICTION_STATUSES,
    Attempt,
    Prediction,
    WebhookDelivery,
    utcnow,
)
from proxy.store.repo import _UNSET, decode_cursor, encode_cursor


class MemoryStore(MemoryIdempotencyMixin, MemoryKeysMixin):
    """Predictions, attempts, budget holds, keys and meta values in dicts."""

    backend = "memory"
    safe_url = "memory://"

    def __init__(self, *, after_write: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.after_write = after_write
        self._predictions: dict[str, Row] = {}
        self._attempts: dict[int, Row] = {}
        self._holds: dict[tuple[str, int], Row] = {}  # (prediction_id, seq) -> hold

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.dispose()

    async def upgrade(self) -> None:
        await turn()

    async def dispose(self) -> None:
        await turn()

    async def ping(self, timeout_s: float = 5.0) -> bool:
        await turn()
        return True

    # -- predictions -------------------------------------------------------

    async def create_prediction(self, p: Prediction, hold: Hold | None = None,
                                claim: Claim | None = None,
                                webhooks: Sequence[WebhookDelivery] = ()) -> Prediction:
        await turn()
        self._check_claim(claim)  # first, as in SQL: a taken key holds nothing
        row = PREDICTIONS.row(p)
        if hold is not None:
            self._check_hold(hold, p.id, 0)
        if p.id in self._predictions:
            raise integrity_error("predictions", "UNIQUE constraint failed: predictions.id")
        if hold is not None:
            self._take_hold(hold, p.id, 0)
        self._predictions[p.id] = row
        self._take_claim(claim, p.id)
        self._wrote("create_prediction")
        return p

    async def create_with_attempt(self, p: Prediction, a: Attempt, hold: Hold | None = None,
                                  attempt_hold: Hold | None = None,
                                  claim: Claim | None = None,
                                  webhooks: Sequence[WebhookDelivery] = ()) -> Prediction:
        await turn()
        self._check_claim(claim)
        row = PREDICTIONS.row(p)
        if hold is not None:
            self._check_hold(hold, p.id, 0)
        if attempt_hold is not None:  # it replaces seq 0: checked without it, as in SQL
            self._check_hold(attempt_hold, p.id, a.seq)
        if p.id in self._predictions:
            raise integrity_error("predictions", "UNIQUE constraint failed: predictions.id")
        self._predictions[p.id] = row  # the attempt's foreign key needs it
        try:
            attempt_row = self._new_attempt(a)
        except BaseException:  # one transaction: nothing of it stays
            del self._predictions[p.id]
            raise
        if hold is not None:
            self._take_hold(hold, p.id, 0)
        if attempt_hold is not None:
            self._take_hold(attempt_hold, p.id, a.seq)
            a.reserved_micro_usd = attempt_hold.amount_micro_usd
        self._insert_attempt(a, attempt_row)
        self._take_claim(claim, p.id)
        self._wrote("create_with_attempt")
        return p

    async def get_prediction(self, prediction_id: str) -> Prediction | None:
        await turn()
        row = self._predictions.get(prediction_id)
        return None if row is None else PREDICTIONS.load(row)

    async def get_with_attempts(
        self, prediction_id: str
    ) -> tuple[Prediction, list[Attempt]] | None:
        await turn()
        row = self._predictions.get(prediction_id)
        if row is None:
            return None
        return PREDICTIONS.load(row), self._attempts_of(prediction_id)

    async def list_predictions(
        self, *, status: str | None = None, api_key_id: str | None = None,
        cursor: str | None = None, limit: int = 50,
    ) -> tuple[list[Prediction], str | None]:
        await turn()
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if status is not None and status not in PREDICTION_STATUSES:
            raise ValueError(f"invalid status {status!r}")
        before = decode_cursor(cursor) if cursor is not None else None
        rows = sorted((r for r in self._predictions.values()
                       if (status is None or r["status"] == status)
                       and (api_key_id is None or r["api_key_id"] == api_key_id)
                       and (before is None or r["id"] < before)),
                      key=lambda r: r["id"], reverse=True)[:limit + 1]
        page = [PREDICTIONS.load(r) for r in rows[:limit]]
        return page, encode_cursor(page[-1].id) if len(rows) > limit else None

    async def update_prediction(self, prediction_id: str, **fields: Any) -> bool:
        await turn()
        values = checked_fields(Prediction, fields, PREDICTION_STATUSES)
        values.setdefault("updated_at", utcnow())
        written = PREDICTIONS.update(self._predictions.get(prediction_id), values)
        self._wrote("update_prediction")
        return written

    async def finish_prediction(
        self, prediction_id: str, *, status: str,
        outputs: list[str] | None = _UNSET, has_nsfw_contents: list[bool] | None = _UNSET,
        error: str | None = _UNSET, error_kind: str | None = _UNSET,
        cost_micro_usd: int = _UNSET, timings: dict[str, Any] | None = _UNSET,
        provider: str | None = _UNSET, request: dict[str, Any] = _UNSET,
        completed_at: datetime | None = None, holds: bool = True,
    ) -> bool:
        await turn()
        given = {"outputs": outputs, "has_nsfw_contents": has_nsfw_contents, "error": error,
                 "error_kind": error_kind, "cost_micro_usd": cost_micro_usd,
                 "timings": timings, "provider": provider, "request": request,
                 "completed_at": completed_at}
        values = prediction_end(status, {k: v for k, v in given.items() if v is not _UNSET},
                                "finish_prediction")
        finished = PREDICTIONS.update(self._active(prediction_id), values)
        if holds:
            self._drop_settled_holds(prediction_id)
        self._wrote("finish_prediction")
        return finished

    async def finish_with_attempt(
        self, prediction_id: str, attempt_id: int, attempt: dict[str, Any], *,
        holds: bool = True, **prediction: Any
    ) -> bool:
        await turn()
        a_values = checked_fields(Attempt, dict(attempt), ATTEMPT_STATUSES)
        p_values = prediction_end(prediction.pop("status"), prediction, "finish_with_attempt")
        a_cells, p_cells = ATTEMPTS.cells(a_values), PREDICTIONS.cells(p_values)
        if (a_row := self._attempts.get(attempt_id)) is not None:
            a_row.update(a_cells)
        finished = self._active(prediction_id)
        if finished is not None:
            finished.update(p_cells)
        if holds:
            self._drop_settled_holds(prediction_id)
        self._wrote("finish_with_attempt")
        return finished is not None

    async def request_cancel(self, prediction_id: str) -> Prediction | None:
        await turn()
        PREDICTIONS.update(self._active(prediction_id),
                           {"cancel_requested": True, "updated_at": utcnow()})
        row = self._predictions.get(prediction_id)
        return None if row is None else PREDICTIONS.load(row)

    async def cancel_requested_among(self, prediction_ids: Iterable[str]) -> list[str]:
        await turn()
        rows = [row for i in set(prediction_ids)
                if (row := self._active(i)) is not None and row["cancel_requested"]]
        # SQL gives no order; SQLite's (by its status index) is kept here.
        return [row["id"] for row in sorted(rows, key=lambda r: (r["status"], r["id"]))]

    # -- attempts ----------------------------------------------------------

    async def attempts_for(self, prediction_ids: Iterable[str]) -> dict[str, list[Attempt]]:
        await turn()
        return {pid: self._attempts_of(pid) for pid in dict.fromkeys(prediction_ids)}

    async def add_attempt(self, a: Attempt) -> Attempt:
        await turn()
        row = self._new_attempt(a)
        self._insert_attempt(a, row)
        self._wrote("add_attempt")
        return a

    async def begin_attempt(self, a: Attempt, hold: Hold | None = None) -> bool:
        await turn()
        pred = self._active(a.prediction_id)
        if pred is None or pred["cancel_requested"]:
            return False
        if hold is not None:
            self._check_hold(hold, a.prediction_id, a.seq)
            a.reserved_micro_usd = hold.amount_micro_usd
        row = self._new_attempt(a)
        if hold is not None and (a.prediction_id, a.seq) in self._holds:
            raise integrity_error("budget_reservations", "UNIQUE constraint failed: "
                                  "budget_reservations.prediction_id, budget_reservations.seq")
        pred["updated_at"] = utcnow()
        if hold is not None:
            self._take_hold(hold, a.prediction_id, a.seq)
        self._insert_attempt(a, row)
        self._wrote("begin_attempt")
        return True

    async def update_attempt(self, attempt_id: int, **fields: Any) -> bool:
        await turn()
        values = checked_fields(Attempt, fields, ATTEMPT_STATUSES)
        written = ATTEMPTS.update(self._attempts.get(attempt_id), values)
        self._wrote("update_attempt")
        return written

    async def accept_attempt(self, attempt: Attempt, *, raise_hold_to: int | None = None,
                             **fields: Any) -> None:
        await turn()
        self._set_attempt(attempt, fields)
        held = self._holds.get((attempt.prediction_id, attempt.seq))
        if raise_hold_to is not None and held is not None and (
                held["amount_micro_usd"] < raise_hold_to):
            held["amount_micro_usd"] = raise_hold_to
        self._wrote("update_attempt")

    async def end_attempt(self, attempt: Attempt, *, holds: bool = True, **fields: Any) -> None:
        await turn()
        self._set_attempt(attempt, fields)
        if holds:
            self._holds.pop((attempt.prediction_id, attempt.seq), None)
        self._wrote("update_attempt")

    # -- leases ------------------------------------------------------------

    async def claim(self, prediction_id: str, owner: str, lease_s: float) -> bool:
        await turn()
        _check_lease(owner, lease_s)
        now = utcnow()
        row = self._predictions.get(prediction_id)
        if row is None or not _claimable(row, now, owner):
            return False
        row |= {"lease_owner": owner, "lease_expires_at": utcnow() + timedelta(seconds=lease_s)}
        return True

    async def claim_resumable(self, owner: str, lease_s: float, limit: int, *,
                              include_own: bool = False) -> list[Prediction]:
        await turn()
        _check_lease(owner, lease_s)
        if limit < 1:
            return []
        now = utcnow()
        own = owner if include_own else None
        ids = sorted(i for i, row in self._predictions.items() if _claimable(row, now, own))
        until = utcnow() + timedelta(seconds=lease_s)
        claimed = []
        for prediction_id in ids[:limit]:
            row = self._predictions[prediction_id]
            row |= {"lease_owner": owner, "lease_expires_at": until}
            claimed.append(PREDICTIONS.load(row))
        return claimed

    async def renew_leases(self, owner: str, ids: Iterable[str], lease_s: float) -> int:
        await turn()
        _check_lease(owner, lease_s)
        until = utcnow() + timedelta(seconds=lease_s)
        held = [row for i in dict.fromkeys(ids)
                if (row := self._predictions.get(i)) is not None and row["lease_owner"] == owner]
        for row in held:
            row["lease_expires_at"] = until
        return len(held)

    async def lost_leases(self, owner: str, ids: Iterable[str]) -> list[str]:
        await turn()
        rows = (self._predictions.get(i) for i in dict.fromkeys(ids))
        return [r["id"] for r in rows if r is not None and r["status"] in ACTIVE_STATUSES
                and r["lease_owner"] is not None and r["lease_owner"] != owner]

    async def release(self, prediction_id: str, owner: str) -> bool:
        await turn()
        row = self._predictions.get(prediction_id)
        if row is None or row["lease_owner"] != owner:
            return False
        row |= {"lease_owner": None, "lease_expires_at": None}
        return True

    # -- budgets and spend ---------------------------------------------------

    async def exposure(self, api_key_id: str, since: datetime) -> tuple[int, int]:
        await turn()
        return self._exposure(api_key_id, since)

    async def spent_since(self, api_key_id: str, since: datetime) -> int:
        await turn()
        return self._exposure(api_key_id, since)[0]

    async def release_stale_holds(self, finished_before: datetime) -> int:
        await turn()
        before = utc(finished_before)
        stale = [k for k in self._holds if (p := self._predictions.get(k[0])) is not None
                 and p["completed_at"] is not None and p["completed_at"] < before]
        for k in stale:
            del self._holds[k]
        return len(stale)

    # -- helpers -------------------------------------------------------------

    def _wrote(self, operation: str) -> None:
        if self.after_write is not None:
            self.after_write(operation)

    def _active(self, prediction_id: str) -> Row | None:
        row = self._predictions.get(prediction_id)
        return row if row is not None and row["status"] in ACTIVE_STATUSES else None

    def _attempts_of(self, prediction_id: str) -> list[Attempt]:
        rows = sorted((r for r in self._attempts.values() if r["prediction_id"] == prediction_id),
                      key=lambda r: r["seq"])
        return [ATTEMPTS.load(r) for r in rows]

    def _new_attempt(self, a: Attempt) -> Row:
        """The row `a` would be, or IntegrityError (foreign key, unique id or seq)."""
        row = ATTEMPTS.row(a)
        if a.prediction_id not in self._predictions:
            raise integrity_error("attempts", "FOREIGN KEY constraint failed")
        if a.id is not None and a.id in self._attempts:
            raise integrity_error("attempts", "UNIQUE constraint failed: attempts.id")
        if any(r["prediction_id"] == a.prediction_id and r["seq"] == a.seq
               for r in self._attempts.values()):
            raise integrity_error("attempts", "UNIQUE constraint failed: "
                                  "attempts.prediction_id, attempts.seq")
        return row

    def _insert_attempt(self, a: Attempt, row: Row) -> None:
        if a.id is None:  # SQLite's INTEGER PRIMARY KEY: one above the largest
            a.id = max(self._attempts, default=0) + 1
        row["id"] = a.id
        self._attempts[a.id] = row

    def _set_attempt(self, attempt: Attempt, fields: dict[str, Any]) -> None:
        values = checked_fields(Attempt, fields, ATTEMPT_STATUSES)
        assert attempt.id is not None
        ATTEMPTS.update(self._attempts.get(attempt.id), values)

    def _exposure(self, api_key_id: str, since: datetime,
                  replacing: tuple[str, int] | None = None) -> tuple[int, int]:
        start = utc(since)
        spent = sum(r["cost_micro_usd"] for r in self._attempts.values()
                    if r["api_key_id"] == api_key_id and r["created_at"] >= start)
        held = sum(h["amount_micro_usd"] for k, h in self._holds.items()
                   if h["api_key_id"] == api_key_id and k != replacing)
        return spent, held

    def _check_hold(self, hold: Hold, prediction_id: str, seq: int) -> None:
        spent, reserved = self._exposure(hold.api_key_id, hold.since,
                                         replacing=(prediction_id, 0) if seq else None)
        if spent + reserved + hold.amount_micro_usd > hold.budget_micro_usd:
            raise BudgetRefused(spent, reserved, hold.amount_micro_usd)

    def _take_hold(self, hold: Hold, prediction_id: str, seq: int) -> None:
        if seq:  # the attempt's own hold replaces the one taken at admission
            self._holds.pop((prediction_id, 0), None)
        self._holds[(prediction_id, seq)] = {"api_key_id": hold.api_key_id,
                                             "amount_micro_usd": hold.amount_micro_usd,
                                             "created_at": utcnow()}

    def _drop_settled_holds(self, prediction_id: str) -> None:
        """The admission hold and those of attempts no longer running."""
        running = {r["seq"] for r in self._attempts.values()
                   if r["prediction_id"] == prediction_id and r["status"] in _RUNNING}
        for k in [k for k in self._holds if k[0] == prediction_id]:
            if k[1] == 0 or k[1] not in running:
                del self._holds[k]


def _claimable(row: Row, now: datetime, own: str | None) -> bool:
    """Non-terminal with no live lease (or, given `own`, a lease held by `own`)."""
    expires = row["lease_expires_at"]
    free = expires is None or expires < now or (own is not None and row["lease_owner"] == own)
    return row["status"] in ACTIVE_STATUSES and free
