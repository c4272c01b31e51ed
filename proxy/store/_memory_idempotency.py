"""`MemoryStore`'s idempotency keys: the same claims, expiry and answers as the SQL
store's (store/idempotency.py), in a dict."""

from __future__ import annotations

from datetime import datetime

from proxy.store._memory_rows import turn, utc
from proxy.store.idempotency import Claim, IdempotencyHit, KeyHit
from proxy.store.models import utcnow


class MemoryIdempotencyMixin:
    def __init__(self) -> None:
        super().__init__()
        # (scope, key) -> (prediction_id, request_hash, expires_at)
        self._idempotency: dict[tuple[str, str], tuple[str, str, datetime]] = {}

    async def find_idempotency(self, scope: str, key: str) -> KeyHit | None:
        await turn()
        return self._live_key(scope, key)

    async def sweep_idempotency(self, expired_before: datetime) -> int:
        await turn()
        gone = [k for k, row in self._idempotency.items() if row[2] <= utc(expired_before)]
        for k in gone:
            del self._idempotency[k]
        return len(gone)

    def _live_key(self, scope: str, key: str) -> KeyHit | None:
        row = self._idempotency.get((scope, key))
        if row is None or row[2] <= utcnow():
            return None
        return KeyHit(row[0], row[1])

    def _check_claim(self, claim: Claim | None) -> None:
        """Raise IdempotencyHit (before anything is written) when the key is taken."""
        if claim is not None and (hit := self._live_key(claim.scope, claim.key)):
            raise IdempotencyHit(hit)

    def _take_claim(self, claim: Claim | None, prediction_id: str) -> None:
        if claim is not None:
            self._idempotency[(claim.scope, claim.key)] = (
                prediction_id, claim.request_hash, utc(claim.expires_at))
