"""Prediction service: submit, wait (sync mode), cancel, read; resume on start.

The row is committed before the client hears of the prediction; a background
task per prediction drives it (runner.py). Leases let several replicas share
one database: a prediction whose driver stopped renewing is taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from structlog.contextvars import bound_contextvars

from common.clock import SYSTEM_CLOCK, Clock
from common.logging import get_logger
from providers.base import GenerationRequest
from proxy import metrics
from proxy.accounts.auth import Principal
from proxy.accounts.budgets import Budgets
from proxy.lifecycle import idempotency
from proxy.lifecycle.errors import Conflict, NoProvider, NotFound, Unavailable
from proxy.lifecycle.notify import DoneNotifier
from proxy.lifecycle.run import Run
from proxy.lifecycle.runner import Runner
from proxy.lifecycle.sweeps import SweepsMixin
from proxy.lifecycle.waiting import wait_elsewhere
from proxy.lifecycle.webhooks import subscriptions
from proxy.routing import Plan, Router
from proxy.schema import MAX_SEED, GenerateRequest
from proxy.store.budget import BudgetRefused
from proxy.store.idempotency import Claim, IdempotencyHit, KeyHit
from proxy.store.models import TERMINAL_STATUSES, Attempt, Prediction, utcnow
from proxy.store.repo import Store

log = get_logger("flux_proxy.service")
# Ended predictions kept for GETs without a query: a few seconds' worth at a high rate.
RECENT_MAX = 2_000
RECENT_TTL_S = 30.0


class PredictionService(SweepsMixin):
    def __init__(
        self,
        store: Store,
        router: Router,
        *,
        instance_id: str,
        lease_s: float = 30.0,
        prediction_deadline_s: float = 600.0,
        idempotency_ttl_s: float = 86_400.0,
        clock: Clock = SYSTEM_CLOCK,
        notifier: DoneNotifier | None = None,
    ) -> None:
        self.store = store
        # Wakes waiters when a prediction ends, here or (PostgreSQL) on any replica.
        self.notifier = notifier or DoneNotifier()
        self.router = router
        self.instance_id = instance_id
        self.lease_s = lease_s
        self.clock = clock
        self.budgets = Budgets(store)
        self.runner = Runner(store, router, prediction_deadline_s, clock, self.budgets)
        self.prediction_deadline_s = prediction_deadline_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self._holds_swept_at = float("-inf")
        self._budgets_published_at: float | None = None
        self._runs: dict[str, Run] = {}
        # Predictions that ended here lately: a client's next GET needs no query.
        self._recent: OrderedDict[str, tuple[float, Run]] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Called when a prediction here starts or ends (the webhook dispatcher's nudge).
        self.on_change: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.notifier.start()
        resumed = await self._claim_orphans(include_own=True)
        if resumed:
            log.info("predictions.resumed", count=resumed, instance_id=self.instance_id)
        await self._publish_budgets()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="lease-sweeper")

    async def stop(self) -> None:
        for task in list(self._background):  # resumptions waiting for the database
            task.cancel()
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        runs = list(self._runs.values())
        for run in runs:
            if run.task:
                run.task.cancel()
        for run in runs:
            if run.task:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run.task
        # Hand the unfinished ones back at once, so a restart or a peer resumes them.
        for run in runs:
            if run.pred.status not in TERMINAL_STATUSES:
                with contextlib.suppress(Exception):
                    await self.store.release(run.pred.id, self.instance_id)
        await self.notifier.stop()

    def _spawn(self, run: Run) -> None:
        self._runs[run.pred.id] = run
        metrics.PREDICTIONS_IN_FLIGHT.inc()
        # Every line its task logs (its attempts' and hedges' tasks copy the context)
        # names the prediction and its key; a submit's also the request id.
        with bound_contextvars(**log_context(run)):
            run.task = asyncio.create_task(self.runner.drive(run),
                                           name=f"prediction-{run.pred.id}")

        def _done(_: asyncio.Task[None]) -> None:
            if self.on_change is not None and run.webhooks:
                self.on_change()
            self._runs.pop(run.pred.id, None)
            if run.pred.status in TERMINAL_STATUSES:
                self._remember(run)
                self.notifier.notify(run.pred.id)  # repeats waiting in this process
            metrics.PREDICTIONS_IN_FLIGHT.dec()
            if run.store_lost and run.pred.status not in TERMINAL_STATUSES:
                self._background_task(self._resume_after_outage(run.pred.id))
            if run.key is not None and run.key.budget_micro_usd is not None:
                self._background_task(self.budgets.publish(run.key))

        run.task.add_done_callback(_done)

    def _background_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _remember(self, run: Run) -> None:
        self._recent[run.pred.id] = (self.clock.monotonic() + RECENT_TTL_S, run)
        while len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)

    def _recent_run(self, prediction_id: str) -> Run | None:
        hit = self._recent.get(prediction_id)
        if hit is None:
            return None
        if hit[0] <= self.clock.monotonic():
            del self._recent[prediction_id]
            return None
        return hit[1]

    # ------------------------------------------------------------------ commands

    def plan_check(self, gen: GenerationRequest, model: str,
                   requested: list[str] | None = None) -> Plan:
        plan = self.router.plan(gen, model=model, requested=requested)
        if not plan.providers:
            configured = bool(self.router.enabled)
            raise NoProvider(
                "no enabled provider can serve this request"
                if configured
                else "no provider is enabled (set VIBEDREAM_API_KEY or WAVESPEED_API_KEY)",
                plan.excluded,
                configured=configured,
            )
        wait = self.router.unavailable_for(plan.providers)
        if wait is not None:
            states = self.router.snapshot()
            why = "; ".join(f"{p.name}: breaker {states[p.name]['state']}, rate-limited for "
                            f"{states[p.name]['rate_limited_for_s']}s" for p in plan.providers)
            raise Unavailable(f"no provider can take this request for {wait:.1f}s ({why})",
                              wait)
        return plan

    async def submit(self, req: GenerateRequest, principal: Principal | None = None, *,
                     surface: str = "native", idempotency_key: str | None = None,
                     base_url: str = "") -> Run:
        """Validate routing and budget, commit the row, start driving it.
        Raises NoProvider or BudgetExceeded before anything is written.
        `surface`: the wire format the request came in (kept with the request, a
        metrics label). With `idempotency_key`, a repeat of the same request (same
        key, client key and surface) returns the prediction the first made, marked
        `replayed`, and submits nothing; IdempotencyMismatch for a different
        request, IdempotencyInProgress when its prediction cannot be read.
        A `webhook` makes its delivery rows in the same transaction; `base_url`: where
        the client reached us, for the urls in their payloads."""
        principal = principal or Principal()
        claim = None if idempotency_key is None else idempotency.make_claim(
            req, principal, surface, idempotency_key, self.idempotency_ttl_s)
        if claim and (hit := await self.store.find_idempotency(claim.scope, claim.key)):
            return await self._replay(hit, claim, principal)
        seed = req.seed if req.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
        gen = req.to_generation(seed)
        plan = self.plan_check(gen, req.model, req.providers)
        now = self.clock.now()
        pred = Prediction(
            model=req.model,
            request=_stored_request(gen, req.providers, surface),
            seed=seed,
            api_key_id=principal.key_id,
            created_at=now,
            updated_at=now,
            lease_owner=self.instance_id,
            # Leases are compared in the store's time (the database clock on PostgreSQL).
            lease_expires_at=utcnow() + timedelta(seconds=self.lease_s),
        )
        key = principal.key
        webhooks = subscriptions(req, pred.id, principal.key_id, base_url)
        # Failover may land on any candidate: hold the dearest one's price.
        expected = max(self.router.expected_cost(p, gen) for p in plan.providers)
        hold = self.budgets.hold(key, expected)
        run = Run(pred=pred, attempts=[], key=key, holds=hold is not None,
                  webhooks=bool(webhooks))
        # A provider free to take it now: the first attempt's row goes in the same
        # transaction as the prediction's, so the sync path writes twice in all.
        admitted = self.runner.acquire(plan.providers)
        try:
            if admitted is None:
                pred = await self.store.create_prediction(pred, hold, claim, webhooks)
            else:
                pred.status, pred.started_at = "processing", now
                attempt = Attempt(prediction_id=pred.id, seq=1, provider=admitted.name,
                                  api_key_id=pred.api_key_id, created_at=now)
                run.admitted_hold = self.budgets.hold(
                    key, self.router.expected_cost(admitted, gen))
                pred = await self.store.create_with_attempt(pred, attempt, hold,
                                                            run.admitted_hold, claim, webhooks)
                run.attempts.append(attempt)
                run.admitted = admitted
        except IdempotencyHit as exc:  # a concurrent repeat claimed the key first
            assert claim is not None
            return await self._replay(exc.hit, claim, principal)
        except BudgetRefused as exc:
            assert key is not None
            raise self.budgets.refused(key, exc) from None
        finally:
            if admitted is not None and run.admitted is None:
                admitted.abandon()  # nothing was written: its slot comes back
        metrics.PREDICTIONS_ACCEPTED.labels(pred.model, surface).inc()
        with bound_contextvars(**log_context(run)):
            log.info("prediction.queued", prediction_id=pred.id, api_key_id=principal.key_id,
                     model=pred.model, surface=surface, mode=gen.mode,
                     num_images=gen.num_images, sync=gen.enable_sync_mode,
                     provider=admitted.name if admitted else None)
        self._spawn(run)
        if webhooks and self.on_change is not None:
            self.on_change()  # a `start` may be due already
        return run

    async def find_replay(self, req: GenerateRequest, principal: Principal, *, surface: str,
                          idempotency_key: str) -> Run | None:
        """The first prediction when this very request was made before under the key;
        None otherwise (`submit` tells a different request apart, after the checks that
        may rewrite it, such as upload URLs). Lets a repeat skip rate limits and checks."""
        claim = idempotency.make_claim(req, principal, surface, idempotency_key,
                                       self.idempotency_ttl_s)
        hit = await self.store.find_idempotency(claim.scope, claim.key)
        if hit is None or hit.request_hash != claim.request_hash:
            return None
        return await self._replay(hit, claim, principal)

    async def _replay(self, hit: KeyHit, claim: Claim, principal: Principal) -> Run:
        local = self._runs.get(hit.prediction_id) or self._recent_run(hit.prediction_id)
        return await idempotency.replay(self.store, hit, claim, principal, local)

    async def wait(self, run: Run, timeout_s: float) -> bool:
        """True when the prediction reached a terminal state within the timeout. One
        this process does not drive (a repeat of a peer's), or stopped driving (a
        peer took it over), is followed through the done notifier and the store."""
        live = self._runs.get(run.pred.id)
        if run.replayed and not run.done.is_set() and (live is None or live.done is not run.done):
            return await wait_elsewhere(self.store, self.notifier, run, timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if not await run.done.sleep(timeout_s):
            return False
        if run.pred.status in TERMINAL_STATUSES:
            return True
        # Its driver here stopped before the end (lease lost): it goes on elsewhere.
        return await wait_elsewhere(self.store, self.notifier, run,
                                    max(0.0, deadline - loop.time()))

    def progress_of(self, prediction_id: str) -> tuple[int, int] | None:
        """(step, total) of a prediction this process drives, where its upstream
        reports steps (the GPU worker); None otherwise."""
        run = self._runs.get(prediction_id)
        return run.progress if run is not None and not run.done.is_set() else None

    async def get(self, prediction_id: str, principal: Principal | None = None
                  ) -> tuple[Prediction, list[Attempt]]:
        """A client key sees only its own predictions; others are 'not found'."""
        run = self._runs.get(prediction_id) or self._recent_run(prediction_id)
        found = (run.pred, list(run.attempts)) if run is not None else (
            await self.store.get_with_attempts(prediction_id))
        if found is None or not _visible(found[0], principal):
            raise NotFound(prediction_id)
        return found

    async def cancel(self, prediction_id: str, principal: Principal | None = None
                     ) -> tuple[Prediction, list[Attempt]]:
        """Cancel durably: the flag is in the database before this answers, and no
        process submits upstream for a flagged prediction after that (the check
        and the attempt row are one transaction, `Store.begin_attempt`).

        The answer is honest: `canceled` when nothing is upstream; otherwise the
        driving process cancels the upstream job and this waits for it briefly,
        answering the prediction as it then is (`cancel_requested` set)."""
        await self.get(prediction_id, principal)  # 404 for someone else's
        run = self._runs.get(prediction_id)
        if run is not None and run.pred.status in TERMINAL_STATUSES:
            # Ended here a moment ago (its task not yet reaped): nothing to cancel.
            raise Conflict(f"prediction is already {run.pred.status}")
        if run is not None:
            run.cancel.fire("canceled by client")
            # Let the runner record the cancel, so the answer shows it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.done.wait(), timeout=5.0)
            return run.pred, list(run.attempts)
        pred = await self.store.request_cancel(prediction_id)
        if pred is None:
            raise NotFound(prediction_id)
        if pred.status in TERMINAL_STATUSES:
            raise Conflict(f"prediction is already {pred.status}")
        found = await self.store.get_with_attempts(prediction_id)
        assert found is not None
        upstream = [a for a in found[1] if a.status in ("submitting", "processing")]
        if not upstream:
            # Nothing is (or can any more be) upstream: it ends here, for every replica.
            await self.store.finish_prediction(prediction_id, status="canceled",
                                               error="canceled by client")
        elif _orphaned(pred) and await self.store.claim(prediction_id, self.instance_id,
                                                        self.lease_s):
            # Its driver is gone: take it over; the run cancels the upstream job.
            await self._adopt(prediction_id)
            if run := self._runs.get(prediction_id):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.done.wait(), timeout=5.0)
                return run.pred, list(run.attempts)
        # Otherwise a live replica drives it: its lease sweeper sees the flag.
        found = await self.store.get_with_attempts(prediction_id)
        assert found is not None
        return found

    async def _adopt(self, prediction_id: str) -> None:
        found = await self.store.get_with_attempts(prediction_id)
        if found is None or prediction_id in self._runs:
            return
        pred = found[0]
        key = await self.store.find_key(pred.api_key_id) if pred.api_key_id else None
        # Resumed: holds may exist from before (its ends look for them).
        self._spawn(Run(pred=pred, attempts=found[1], key=key, holds=True))


def log_context(run: Run) -> dict[str, str]:
    """The fields every log line about `run` carries (structlog contextvars)."""
    if run.key is None:
        return {"prediction_id": run.pred.id}
    return {"prediction_id": run.pred.id, "key_name": run.key.name}


def _orphaned(pred: Prediction) -> bool:
    """No live lease: nobody is driving it."""
    return pred.lease_owner is None or pred.lease_expires_at is None or (
        pred.lease_expires_at <= utcnow())


def _visible(pred: Prediction, principal: Principal | None) -> bool:
    return principal is None or principal.sees_all or pred.api_key_id == principal.key_id


def _stored_request(gen: GenerationRequest, providers: list[str] | None,
                    surface: str = "native") -> dict[str, object]:
    stored: dict[str, object] = asdict(gen)
    if providers:
        stored["providers"] = list(providers)
    if surface != "native":  # absent: native (rows from before surfaces read the same)
        stored["surface"] = surface
    return stored
