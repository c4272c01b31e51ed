"""Idempotency keys, the service's side: what a keyed submit claims, how a repeat is
told from a different request, and waiting for a prediction another process (or an
earlier request) drives is lifecycle/waiting.py. The rows and their atomic claim are
store/idempotency.py's.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from common.logging import get_logger
from proxy.accounts.auth import Principal
from proxy.lifecycle.run import Run
from proxy.schema import GenerateRequest
from proxy.store.idempotency import Claim, KeyHit
from proxy.store.models import TERMINAL_STATUSES, utcnow
from proxy.store.repo import Store

log = get_logger("flux_proxy.service")


class IdempotencyMismatch(Exception):
    """The key was used for a different request (a 422)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used with a different "
                         "request; use a new key for a new request")
        self.key = key


class IdempotencyInProgress(Exception):
    """The key's prediction cannot be read (yet): try again (a 409)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"a request with Idempotency-Key {key!r} is still being admitted; "
                         "retry shortly")
        self.key = key


def request_hash(req: GenerateRequest, surface: str) -> str:
    """SHA-256 of the surface and the canonical (validated, defaults applied) request."""
    canonical = req.model_dump_json(exclude_none=False)
    return hashlib.sha256(f"{surface}\n{canonical}".encode()).hexdigest()


def make_claim(req: GenerateRequest, principal: Principal, surface: str, key: str,
               ttl_s: float) -> Claim:
    # Admin and auth off share one scope ("").
    return Claim(scope=principal.key_id or "", key=key,
                 request_hash=request_hash(req, surface),
                 expires_at=utcnow() + timedelta(seconds=ttl_s))


async def replay(store: Store, hit: KeyHit, claim: Claim, principal: Principal,
                 local: Run | None) -> Run:
    """The prediction an idempotency key made, for a repeat of its request: a view of
    `local` (the run this process drives or lately drove: same prediction, attempts
    and done signal), else rebuilt from the store. Marked `replayed`."""
    if hit.request_hash != claim.request_hash:
        raise IdempotencyMismatch(claim.key)
    if local is not None:
        run = Run(pred=local.pred, attempts=local.attempts, done=local.done, key=local.key,
                  replayed=True)
    else:
        found = await store.get_with_attempts(hit.prediction_id) if hit.prediction_id else None
        if found is None:
            raise IdempotencyInProgress(claim.key)
        run = Run(pred=found[0], attempts=found[1], key=principal.key, replayed=True)
        if run.pred.status in TERMINAL_STATUSES:
            run.done.set()
    log.info("prediction.replayed", prediction_id=hit.prediction_id,
             api_key_id=principal.key_id)
    return run
