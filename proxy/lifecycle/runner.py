"""The lifecycle of one prediction: providers tried in routed order until one
serves it, a policy refusal ends it, or its deadline passes.

Every step is written to the store before the next begins, so a restarted
process resumes from the last recorded step: it polls an upstream id it
already has and never submits the same attempt twice.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from typing import Any

from structlog.contextvars import bound_contextvars

from common.clock import SYSTEM_CLOCK, Clock
from common.logging import get_logger
from providers.base import ErrorKind, GenerationRequest, JobStatus, Provider, UpstreamJob
from proxy import metrics
from proxy.accounts.budgets import Budgets
from proxy.lifecycle.attempts import Attempts
from proxy.lifecycle.hedging import first_result, hedged, propagate
from proxy.lifecycle.polling import Canceled
from proxy.lifecycle.run import CancelSignal, Outcome, Run, ms
from proxy.lifecycle.steps import Plan as StepPlan
from proxy.lifecycle.steps import Step, resume_steps
from proxy.lifecycle.waste import count_waste
from proxy.outputs_store import OutputStore
from proxy.routing import Plan, Router
from proxy.routing.admission import Admitted
from proxy.schema import generation_from_stored
from proxy.store import outage
from proxy.store.repo import Store

__all__ = ["Outcome", "Run", "Runner"]

log = get_logger("flux_proxy.runner")
# A provider that answered 429 created nothing: it may be asked again after its cooldown.
_RETRY_SAME = frozenset({ErrorKind.RATE_LIMITED.value})


def without_inline_images(request: dict[str, Any]) -> dict[str, Any] | None:
    """The stored request with inline (data: URI) images replaced by their SHA-256,
    or None when it has none. Applied when a prediction ends: until then a failover
    or a resume must be able to send the image again."""
    slim, changed = dict(request), False
    for name in ("image", "mask_image"):
        value = slim.get(name)
        if isinstance(value, str) and value.startswith("data:"):
            slim[name] = "sha256:" + hashlib.sha256(value.encode("ascii", "replace")).hexdigest()
            changed = True
    return slim if changed else None


class Runner:
    def __init__(self, store: Store, router: Router, prediction_deadline_s: float,
                 clock: Clock = SYSTEM_CLOCK, budgets: Budgets | None = None) -> None:
        self.store = store
        self.router = router
        self.clock = clock
        self.attempts = Attempts(store, router, timedelta(seconds=prediction_deadline_s), clock,
                                 budgets or Budgets(store))
        # Set by the app when `output_store` is configured: outputs are copied there.
        self.output_store: OutputStore | None = None

    async def _set_pred(self, run: Run, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(run.pred, key, value)
        await self.store.update_prediction(run.pred.id, **fields)

    # ------------------------------------------------------------------ the lifecycle

    async def drive(self, run: Run) -> None:
        try:
            await self._drive(run)
        except asyncio.CancelledError:
            raise  # shutdown: the lease lapses and the prediction resumes elsewhere
        except Exception as exc:
            if outage.is_outage(exc):
                # The database is gone for longer than a write waits: failing it now
                # could drop a paid job. The rows say how far it got; it is resumed
                # from them when the database answers (service: `store_lost`).
                log.warning("prediction.store_unavailable", prediction_id=run.pred.id,
                            error=f"{type(exc).__name__}: {str(exc)[:200]}")
                run.store_lost = True
                return
            # A bug must not leave it hanging.
            log.exception("prediction.crashed", prediction_id=run.pred.id)
            try:
                await self._close_open_attempts(run)
                await self._finish(
                    run, "failed", Outcome(False, error=f"internal error: {type(exc).__name__}")
                )
            except Exception:
                log.exception("prediction.finish_failed", prediction_id=run.pred.id)
        finally:
            run.done.set()

    async def _drive(self, run: Run) -> None:
        pred = run.pred
        gen = generation_from_stored(pred.request)
        # What the rows say comes next; admitted at submit, its first attempt (written,
        # not yet sent) is simply submitted.
        plan = StepPlan((Step.SUBMIT,)) if run.admitted is not None else resume_steps(
            pred, run.attempts)
        if Step.DONE in plan.steps:
            return
        if Step.CANCEL in plan.steps:  # asked while no one drove it: no new submit, ever
            run.cancel.fire("canceled by client")
        if Step.START in plan.steps:
            await self._set_pred(run, status="processing", started_at=self.clock.now())
            log.info("prediction.processing", prediction_id=pred.id, api_key_id=pred.api_key_id)
        try:
            outcome = await self._resume_inflight(run, gen, plan)
            if outcome is None or (not outcome.ok and outcome.retryable):
                outcome = await self._try_providers(run, gen, outcome)
        except Canceled:
            await self._finish(run, "canceled", Outcome(False, error=run.cancel.reason))
            return
        await self._finish(run, "completed" if outcome.ok else "failed", outcome)

    async def _close_open_attempts(self, run: Run) -> None:
        """After a crash inside the lifecycle: an attempt left open may have a job
        upstream (it may be billed), so it is closed `unknown` at its expected price
        rather than left at no cost."""
        gen = generation_from_stored(run.pred.request)
        for attempt in run.attempts:
            if attempt.completed_at is None and attempt.id is not None and (
                    attempt.id not in run.pending):
                provider = self.router.resumed(attempt.provider)
                cost = self.router.expected_cost(provider, gen) if provider else 0
                await self.attempts.end(run, attempt, provider, "unknown", cost=cost,
                                        error="outcome unknown: the proxy failed mid-attempt",
                                        kind=ErrorKind.OUTCOME_UNKNOWN)

    async def _resume_inflight(self, run: Run, gen: GenerationRequest, plan: StepPlan
                               ) -> Outcome | None:
        """Continue from what the store says (a restart, or a takeover from a dead
        replica): every attempt that has an upstream job is followed again (a
        completed one is re-read for its outputs), and one that died before its
        upstream id was recorded is closed as outcome-unknown, never resubmitted."""
        last: Outcome | None = None
        for attempt in plan.close_unknown:
            provider = self.router.resumed(attempt.provider)
            msg = "outcome unknown: the proxy stopped while submitting"
            cost = self.router.expected_cost(provider, gen) if provider else 0
            await self.attempts.end(run, attempt, provider, "unknown", cost=cost, error=msg,
                                    kind=ErrorKind.OUTCOME_UNKNOWN)
            last = Outcome(False, provider=attempt.provider, error=msg,
                           kind=ErrorKind.OUTCOME_UNKNOWN, attempt=attempt)
        upstream = [*plan.follow, *plan.read_back]
        follows: dict[asyncio.Task[Outcome], CancelSignal] = {}
        for attempt in upstream:
            provider = self.router.resumed(attempt.provider)
            log.info("attempt.resumed", prediction_id=run.pred.id, provider=attempt.provider,
                     attempt=attempt.seq, upstream_id=attempt.upstream_id, status=attempt.status)
            if provider is None:  # no longer configured: it cannot be read back
                continue
            # The quote made at accept: a resumed attempt is charged what was quoted.
            job = UpstreamJob(attempt.upstream_id or "", JobStatus.PROCESSING,
                              poll_url=attempt.poll_url,
                              charged_micro_usd=attempt.quoted_micro_usd)
            signal = CancelSignal()
            if run.cancel.is_set():
                signal.fire(run.cancel.reason)
            with bound_contextvars(provider=attempt.provider, attempt=attempt.seq):  # the task's
                follows[asyncio.create_task(self.attempts.follow(
                    run, provider, attempt, gen, job, signal,
                    read_back=attempt.status == "completed"))] = signal
        if not follows:
            return last
        watcher = asyncio.create_task(propagate(run.cancel, list(follows.values())))
        try:
            return await first_result(self.attempts, run, follows)
        finally:
            watcher.cancel()

    async def _try_providers(
        self, run: Run, gen: GenerationRequest, last: Outcome | None
    ) -> Outcome:
        requested = run.pred.request.get("providers")
        limit = self.router.settings.max_attempts
        plan = Plan(providers=[])
        if run.admitted is not None:  # routed at submit: that attempt goes first
            plan = self.router.plan(gen, model=run.pred.model, requested=requested)
            last = await self._attempt(run, run.admitted, gen, plan)
            if last.ok or not last.retryable:
                return last
        # Bounded: each turn either makes an attempt or waits for a provider to free up.
        for _ in range(4 * limit + 4):
            if run.cancel.is_set():
                raise Canceled
            if len(run.attempts) >= limit:
                break
            left = (self.attempts.deadline_of(run) - self.clock.now()).total_seconds()
            if left <= 0:
                return Outcome(False, error="prediction deadline passed", kind=ErrorKind.TIMEOUT)
            spent = {a.provider for a in run.attempts if a.error_kind not in _RETRY_SAME}
            plan = self.router.plan(gen, model=run.pred.model, requested=requested,
                                    exclude=spent)
            if not plan.providers:
                break
            provider = self.acquire(plan.providers)
            if provider is None:  # every candidate is open or rate-limited: wait for one
                wait = min(self.router.available_in(p.name) for p in plan.providers)
                if wait >= left or self.router.unavailable_for(plan.providers) is not None:
                    return Outcome(False, kind=ErrorKind.UNAVAILABLE, error=(
                        f"no provider available for {wait:.1f}s: "
                        + self._health_summary(plan.providers)))
                await self._sleep(run, max(wait, 0.01))
                continue
            if last is not None and last.provider == provider.name:
                metrics.RETRIES.labels(provider.name,
                                       last.kind.value if last.kind else "unavailable").inc()
                log.info("attempt.retry", prediction_id=run.pred.id, provider=provider.name,
                         reason=last.kind.value if last.kind else None)
            elif last is not None and last.provider and last.kind is not None:
                metrics.FAILOVERS.labels(last.provider, provider.name, last.kind.value).inc()
                log.info("prediction.failover", prediction_id=run.pred.id,
                         from_provider=last.provider, to_provider=provider.name,
                         reason=last.kind.value)
            last = await self._attempt(run, provider, gen, plan)
            if last.ok or not last.retryable:
                return last
        if last is not None:
            return last
        why = plan.explain() or "no provider is enabled"
        return Outcome(False, error=f"no provider can serve this request ({why})",
                       kind=ErrorKind.UNAVAILABLE)

    def acquire(self, providers: list[Provider]) -> Admitted | None:
        """The first provider whose breaker and rate limit let it take an attempt now."""
        for provider in providers:
            admitted = self.router.acquire(provider.name)
            if admitted is not None:
                return admitted
        return None

    async def _attempt(self, run: Run, provider: Admitted, gen: GenerationRequest,
                       plan: Plan) -> Outcome:
        delay = self.router.hedge_delay(run.pred.model, provider.name)
        backups = [p for p in plan.providers if p.name != provider.name]
        if delay is None or not backups:
            return await self.attempts.run(run, provider, gen, run.cancel)
        return await hedged(self.attempts, run, provider, gen, delay, backups)

    def _health_summary(self, providers: list[Provider]) -> str:
        snap = self.router.snapshot()
        return "; ".join(
            f"{p.name}: breaker {snap[p.name]['state']}, "
            f"rate-limited {snap[p.name]['rate_limited_for_s']}s" for p in providers)

    @staticmethod
    async def _sleep(run: Run, seconds: float) -> None:
        if await run.cancel.sleep(seconds):
            raise Canceled

    # ------------------------------------------------------------------ the end

    async def _write_end(self, run: Run, outcome: Outcome | None, **fields: Any) -> bool:
        """The prediction's end, in one transaction with its completed attempt's row;
        any other completed attempt waiting (a hedge that lost by a hair) after it."""
        run.closed = True
        pending, run.pending = run.pending, {}
        winner = outcome.attempt if outcome is not None else None
        first = winner.id if winner is not None and winner.id in pending else next(
            iter(pending), None)
        # Safe to repeat (a repeat after a lost acknowledgement finds it ended: False).
        if first is None:
            return await outage.retrying(lambda: self.store.finish_prediction(
                run.pred.id, holds=run.holds, **fields))
        attempt_end = pending.pop(first)
        ended = await outage.retrying(lambda: self.store.finish_with_attempt(
            run.pred.id, first, attempt_end, holds=run.holds, **fields))
        by_id = {a.id: a for a in run.attempts}
        for attempt_id, attempt_fields in pending.items():
            await self.store.end_attempt(by_id[attempt_id], holds=run.holds, **attempt_fields)
        return ended

    async def _keep_outputs(self, run: Run, outcome: Outcome) -> None:
        """Copy the outputs into the output store before the end is written, so the
        URLs the client then hears of already work (bounded: output_copy_timeout_s);
        one that cannot be kept stays the provider's URL."""
        store, name = self.output_store, outcome.provider
        provider = self.router.providers.get(name) if store and name else None
        if store is not None and provider is not None and outcome.outputs:
            outcome.outputs = await store.keep(provider, run.pred.id, outcome.outputs)

    async def _finish(self, run: Run, status: str, outcome: Outcome | None) -> None:
        pred = run.pred
        if status == "completed" and outcome is not None and outcome.ok:
            await self._keep_outputs(run, outcome)
        now = self.clock.now()
        started = pred.started_at or now
        last = run.attempts[-1] if run.attempts else None
        timings = {"queue_ms": ms(started - pred.created_at), "total_ms": ms(now - pred.created_at)}
        winner = next((a for a in reversed(run.attempts) if a.status == "completed"), last)
        if winner is not None and winner.latency_ms is not None:
            timings["upstream_ms"] = winner.latency_ms
        if outcome is not None and outcome.inference_ms is not None:
            timings["inference_ms"] = outcome.inference_ms
        ok = outcome is not None and outcome.ok
        failure = None if ok or outcome is None else outcome
        fields: dict[str, Any] = {
            "provider": outcome.provider if ok and outcome else (last.provider if last else None),
            "outputs": outcome.outputs if ok and outcome else [],
            "has_nsfw_contents": outcome.nsfw if ok and outcome else [],
            "error": failure.error if failure else None,
            "error_kind": failure.kind.value if failure and failure.kind else None,
            "cost_micro_usd": sum(a.cost_micro_usd for a in run.attempts),
            "timings": timings,
        }
        slim = without_inline_images(pred.request)
        if slim is not None:  # only a resume needed them: the row keeps a digest
            fields["request"] = slim
        if not await self._write_end(run, outcome, status=status, completed_at=now, **fields):
            # Someone else ended it first (a cancel handled elsewhere): theirs stands.
            stored = await self.store.get_prediction(pred.id)
            if stored is not None:
                for key in ("status", *fields, "completed_at"):
                    setattr(pred, key, getattr(stored, key))
            return
        for key, value in fields.items():
            setattr(pred, key, value)
        pred.status, pred.completed_at = status, now
        pred.lease_owner = pred.lease_expires_at = None
        provider_label = pred.provider or "none"
        run.delivered = outcome.attempt if ok and outcome else None
        count_waste(run, run.delivered)
        metrics.QUEUE_WAIT.labels(pred.model).observe(timings["queue_ms"] / 1000)
        surface = str((pred.request or {}).get("surface", "native"))
        metrics.PREDICTIONS_FINISHED.labels(pred.model, provider_label, status, surface).inc()
        metrics.PREDICTION_DURATION.labels(pred.model, provider_label, status).observe(
            timings["total_ms"] / 1000)
        log.info("prediction.finished", prediction_id=pred.id, api_key_id=pred.api_key_id,
                 provider=pred.provider, status=status, attempts=len(run.attempts),
                 error_kind=pred.error_kind, cost_micro_usd=pred.cost_micro_usd,
                 total_ms=timings["total_ms"])
