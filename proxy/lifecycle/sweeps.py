"""The service's background duties, once per sweep: renew the leases of what this
process drives (and let go of what another took over), see cancels flagged on other
replicas, resume orphans, release stale budget holds and expired idempotency keys,
publish budget gauges."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from common.clock import Clock
from common.logging import get_logger
from proxy.accounts.budgets import Budgets
from proxy.lifecycle.run import Run
from proxy.store import outage
from proxy.store.models import utcnow
from proxy.store.repo import Store

log = get_logger("flux_proxy.service")


class SweepsMixin:
    store: Store
    instance_id: str
    lease_s: float
    clock: Clock
    budgets: Budgets
    prediction_deadline_s: float
    _runs: dict[str, Run]
    _holds_swept_at: float
    _budgets_published_at: float | None

    async def _adopt(self, prediction_id: str) -> None:
        raise NotImplementedError

    async def _sweep_forever(self) -> None:
        interval = max(0.05, self.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                ids = [i for i, r in self._runs.items() if not r.done.is_set()]
                if ids:
                    held = await self.store.renew_leases(self.instance_id, ids, self.lease_s)
                    if held < len(ids):
                        await self._let_go(await self.store.lost_leases(self.instance_id, ids))
                    # A cancel that reached another replica: it set the flag for us.
                    for pred_id in await self.store.cancel_requested_among(ids):
                        if run := self._runs.get(pred_id):
                            run.cancel.set()
                await self._claim_orphans(include_own=False)
                await self._release_stale_holds()
                await self._publish_budgets()
            except Exception:  # keep sweeping; a store blip must not stop renewals
                log.exception("lease.sweep_failed")

    async def _let_go(self, lost: list[str]) -> None:
        """Predictions another process took over (our lease lapsed: a stall, a
        partition): stop driving them here, as a crash would; the new owner resumes
        from the rows, and our sync waiters follow it (waiting.py)."""
        for pred_id in lost:
            run = self._runs.get(pred_id)
            if run is not None and run.task is not None and not run.done.is_set():
                log.warning("lease.lost", prediction_id=pred_id, instance_id=self.instance_id)
                run.task.cancel()

    async def _resume_after_outage(self, prediction_id: str) -> None:
        """A run stopped by a database outage: take it up again from its rows once the
        database answers (our own lease still holds it, so no peer waits out lease_s).
        Gives up when someone else holds it or it ended."""
        delay = 0.5
        deadline = self.clock.monotonic() + self.prediction_deadline_s
        while self.clock.monotonic() < deadline:
            await asyncio.sleep(delay)
            try:
                if await self.store.claim(prediction_id, self.instance_id, self.lease_s):
                    await self._adopt(prediction_id)
                    log.info("prediction.resumed_after_outage", prediction_id=prediction_id)
                return
            except Exception as exc:
                if not outage.is_outage(exc):
                    log.exception("prediction.resume_failed", prediction_id=prediction_id)
                    return
            delay = min(delay * 2, 5.0)

    async def _publish_budgets(self) -> None:
        """About once a minute (and at start): every budgeted key's gauges."""
        now = self.clock.monotonic()
        if self._budgets_published_at is not None and now - self._budgets_published_at < 60:
            return
        self._budgets_published_at = now
        try:
            await self.budgets.publish_all()
        except Exception:  # a metric must never stop the sweeper (or the start)
            log.exception("budget.publish_failed")

    async def _release_stale_holds(self) -> None:
        """About once a minute: budget holds of attempts whose process died after
        their prediction ended (a hedge loser; no attempt outlives its prediction's
        deadline, so a hold older than that holds nothing real), and expired
        idempotency keys (a claim replaces an expired one anyway: this bounds the table)."""
        if self.clock.monotonic() - self._holds_swept_at < 60:
            return
        self._holds_swept_at = self.clock.monotonic()
        cutoff = utcnow() - timedelta(seconds=self.prediction_deadline_s)
        if released := await self.store.release_stale_holds(cutoff):
            log.info("budget.stale_holds_released", count=released)
        if swept := await self.store.sweep_idempotency(utcnow()):
            log.info("idempotency.keys_swept", count=swept)

    async def _claim_orphans(self, *, include_own: bool) -> int:
        preds = await self.store.claim_resumable(
            self.instance_id, self.lease_s, limit=500, include_own=include_own
        )
        count = 0
        for pred in preds:
            if pred.id not in self._runs:
                await self._adopt(pred.id)
                count += 1
        return count
