"""One upstream attempt: write the row, submit, follow the job, record the outcome.

The attempt row is written before the POST and updated with the upstream id
right after, so a crash at any point is recoverable (runner.py resumes it).
Every outcome is fed back to the router (breaker, rate limits, latency).
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timedelta
from typing import Any

from structlog.contextvars import bound_contextvars
from tenacity import RetryError

from common.clock import Clock
from common.logging import get_logger
from providers.base import (
    ErrorKind,
    GenerationRequest,
    JobStatus,
    OutcomeUnknown,
    ProviderError,
    UpstreamJob,
)
from proxy import metrics
from proxy.accounts.budgets import BudgetExceeded, Budgets
from proxy.lifecycle import outputs
from proxy.lifecycle.polling import Canceled, PollTrace, wait_terminal
from proxy.lifecycle.run import CancelSignal, Outcome, Run, ms
from proxy.routing import Router
from proxy.routing.admission import Admitted
from proxy.store import outage
from proxy.store.budget import BudgetRefused, Hold
from proxy.store.models import Attempt
from proxy.store.repo import Store

log = get_logger("flux_proxy.attempts")


class Attempts:
    def __init__(self, store: Store, router: Router, deadline: timedelta, clock: Clock,
                 budgets: Budgets) -> None:
        self.store = store
        self.router = router
        self.deadline = deadline
        self.clock = clock
        self.budgets = budgets

    def deadline_of(self, run: Run) -> datetime:
        return run.pred.created_at + self.deadline

    async def run(
        self, run: Run, provider: Admitted, gen: GenerationRequest, cancel: CancelSignal,
    ) -> Outcome:
        """A new attempt on `provider` (admitted by the router). Raises Canceled
        when `cancel` fires, or when the prediction was canceled or ended elsewhere
        before this submit could start (checked atomically with the attempt's row)."""
        if run.admitted is provider:  # admitted at submit: its row is written already
            return await self._run_admitted(run, provider, gen, cancel)
        attempt = Attempt(prediction_id=run.pred.id, seq=len(run.attempts) + 1,
                          provider=provider.name, api_key_id=run.pred.api_key_id,
                          created_at=self.clock.now())
        run.attempts.append(attempt)  # seq is taken before any await: hedges never clash
        hold = self.budgets.hold(run.key, self.router.expected_cost(provider, gen))
        run.holds = run.holds or hold is not None
        refusal: BudgetExceeded | None = None
        try:
            try:
                began = await self.store.begin_attempt(attempt, hold)
            except BudgetRefused as exc:
                began = False
                assert run.key is not None
                refusal = self.budgets.refused(run.key, exc)
            if not began:
                run.attempts.remove(attempt)
                attempt.completed_at = attempt.created_at  # nothing to give back upstream
                provider.abandon()
                if refusal is not None:  # no submit we cannot pay for, not even a failover
                    return Outcome(False, provider=provider.name, error=str(refusal),
                                   kind=ErrorKind.BUDGET, final=True)
                raise Canceled
            with bound_contextvars(provider=provider.name, attempt=attempt.seq):  # its log lines
                return await self._submit_and_follow(run, provider, gen, cancel, attempt, hold)
        finally:
            if attempt.completed_at is None:
                provider.abandon()  # shutdown (or a store error) mid-attempt

    async def _run_admitted(self, run: Run, provider: Admitted, gen: GenerationRequest,
                            cancel: CancelSignal) -> Outcome:
        attempt, hold = run.attempts[0], run.admitted_hold
        run.admitted = run.admitted_hold = None
        try:
            if cancel.is_set():  # canceled before the submit: nothing went upstream
                await self.end(run, attempt, None, "canceled", cost=0, error=cancel.reason)
                provider.abandon()
                raise Canceled
            with bound_contextvars(provider=provider.name, attempt=attempt.seq):  # its log lines
                return await self._submit_and_follow(run, provider, gen, cancel, attempt, hold)
        finally:
            if attempt.completed_at is None:
                provider.abandon()

    async def _submit_and_follow(
        self, run: Run, provider: Admitted, gen: GenerationRequest, cancel: CancelSignal,
        attempt: Attempt, hold: Hold | None,
    ) -> Outcome:
        log.info("attempt.submitting", prediction_id=run.pred.id, provider=provider.name,
                 attempt=attempt.seq, api_key_id=run.pred.api_key_id)
        remaining = (self.deadline_of(run) - self.clock.now()).total_seconds()
        try:
            try:
                async with asyncio.timeout(max(0.001, remaining)):
                    job = await provider.submit(gen)
            except TimeoutError:
                raise OutcomeUnknown(
                    f"{provider.name}: no answer to the submit before the prediction deadline",
                    provider=provider.name,
                ) from None
        except ProviderError as exc:
            unknown = exc.kind is ErrorKind.OUTCOME_UNKNOWN
            error = exc.message
            if unknown and not provider.capabilities.cancel:
                # Neither poll nor cancel is possible without an upstream id: say so.
                error += "; it cannot be polled or canceled without an id, so it was left"
            await self.end(run, attempt, provider, "unknown" if unknown else "failed",
                           cost=self.router.expected_cost(provider, gen) if unknown else 0,
                           error=error, kind=exc.kind, http_status=exc.status_code,
                           retry_after=exc.retry_after)
            return Outcome(False, provider=provider.name, error=error, kind=exc.kind)
        if job.charged_micro_usd is not None:
            self.router.learn_quote(provider.name, gen, job.charged_micro_usd)
        ids = {"upstream_id": job.upstream_id, "poll_url": job.poll_url}
        for key, value in ids.items():
            setattr(attempt, key, value)
        if job.status.terminal:  # answered synchronously: one write instead of two
            return await self.follow(run, provider, attempt, gen, job, cancel, extra=ids)
        assert attempt.id is not None
        # A quote above what was held raises the hold at once, so the key's other
        # submits see the real exposure (the job exists: it is paid either way).
        quoted = job.charged_micro_usd
        raise_to = quoted if hold is not None and quoted is not None and (
            quoted > attempt.reserved_micro_usd) else None
        # The upstream id is what makes the job followable: a database outage here
        # is waited out (the UPDATE is safe to repeat) rather than losing a paid job.
        await outage.retrying(lambda: self.store.accept_attempt(
            attempt, raise_hold_to=raise_to, status="processing", quoted_micro_usd=quoted,
            **ids))
        attempt.status, attempt.quoted_micro_usd = "processing", quoted
        log.info("attempt.accepted", prediction_id=run.pred.id, provider=provider.name,
                 attempt=attempt.seq, upstream_id=job.upstream_id)
        if job.ready_after_s is None:  # no estimate from the upstream: a learned one
            learned = self.router.ready_after(provider.name)
            if learned is not None:
                job = dataclasses.replace(job, ready_after_s=learned)
        return await self.follow(run, provider, attempt, gen, job, cancel, learn=True)

    async def follow(
        self,
        run: Run,
        provider: Admitted,
        attempt: Attempt,
        gen: GenerationRequest,
        job: UpstreamJob,
        cancel: CancelSignal,
        extra: dict[str, Any] | None = None,
        *,
        read_back: bool = False,
        learn: bool = False,
    ) -> Outcome:
        """Wait for an accepted job to end, then record it. `read_back`: the row
        already says completed (a crash came before the prediction's end was
        written): fetch its outputs again, and never fail over from it."""
        if read_back:
            return await self._read_back(run, provider, attempt, gen, job, cancel)
        extra = extra or {}
        name = provider.name
        until = min(attempt.created_at + timedelta(seconds=provider.settings.deadline_s),
                    self.deadline_of(run))
        trace = PollTrace() if learn else None
        try:
            if not job.status.terminal:
                job = await wait_terminal(provider, job, until, cancel, self.clock, trace,
                                          on_progress=run.set_progress)
        except Canceled:
            await self._cancel_upstream(provider, job)
            await self.end(run, attempt, provider, "canceled", error=cancel.reason,
                           cost=provider.attempt_cost_micro_usd(gen, job), **extra)
            raise
        except RetryError:
            await self._cancel_upstream(provider, job)
            msg = f"{name}: no result before the deadline"
            await self.end(run, attempt, provider, "failed", error=msg, kind=ErrorKind.TIMEOUT,
                           cost=provider.attempt_cost_micro_usd(gen, job), **extra)
            return Outcome(False, provider=name, error=msg, kind=ErrorKind.TIMEOUT)
        except ProviderError as exc:
            await self.end(run, attempt, provider, "failed", error=exc.message, kind=exc.kind,
                           http_status=exc.status_code,
                           cost=provider.attempt_cost_micro_usd(gen, job), **extra)
            return Outcome(False, provider=name, error=exc.message, kind=exc.kind)

        cost = provider.attempt_cost_micro_usd(gen, job)
        if trace is not None and job.status is JobStatus.COMPLETED:
            self.router.learn_ready(name, running_at_s=trace.running_at_s,
                                    done_at_first_poll_s=trace.done_at_first_poll_s)
        if job.status is JobStatus.COMPLETED:
            try:
                outs, flags = await outputs.normalize(provider, gen, job)
            except ProviderError as exc:
                await self.end(run, attempt, provider, "failed", error=exc.message, kind=exc.kind,
                               cost=cost, **extra)
                return Outcome(False, provider=name, error=exc.message, kind=exc.kind)
            await self.end(run, attempt, provider, "completed", cost=cost, images=len(outs),
                           **extra)
            metrics.IMAGES.labels(name).inc(len(outs))
            if nsfw := sum(1 for flag in flags if flag):
                metrics.NSFW_IMAGES.labels(name).inc(nsfw)
            return Outcome(True, provider=name, outputs=outs, nsfw=flags,
                           inference_ms=job.inference_ms, attempt=attempt)
        kind = job.error_kind or ErrorKind.UNAVAILABLE
        status = "canceled" if job.status is JobStatus.CANCELED else "failed"
        error = job.error or f"upstream job {job.raw_status or status}"
        await self.end(run, attempt, provider, status, error=error, kind=kind, cost=cost, **extra)
        return Outcome(False, provider=name, error=error, kind=kind)

    async def _read_back(self, run: Run, provider: Admitted, attempt: Attempt,
                         gen: GenerationRequest, job: UpstreamJob,
                         cancel: CancelSignal) -> Outcome:
        until = min(self.clock.now() + timedelta(seconds=provider.settings.deadline_s),
                    self.deadline_of(run))
        error = "the job completed upstream (and was paid for) but its outputs could not be read"
        try:
            job = await wait_terminal(provider, job, until, cancel, self.clock)
            if job.status is JobStatus.COMPLETED:
                outs, flags = await outputs.normalize(provider, gen, job)
                run.pending[attempt.id or 0] = {"images": len(outs)}  # the row stays as it is
                return Outcome(True, provider=provider.name, outputs=outs, nsfw=flags,
                               inference_ms=job.inference_ms, attempt=attempt)
            error += f" back: upstream now says {job.raw_status or job.status.value}"
        except (RetryError, ProviderError) as exc:
            reason = exc.message if isinstance(exc, ProviderError) else "no answer"
            error += f" back: {reason}"
        return Outcome(False, provider=provider.name, error=error, kind=ErrorKind.UNAVAILABLE,
                       attempt=attempt, final=True)

    async def end(
        self,
        run: Run,
        attempt: Attempt,
        provider: Admitted | None,
        status: str,
        *,
        cost: int,
        error: str | None = None,
        kind: ErrorKind | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
        **extra: Any,
    ) -> None:
        """Record a finished attempt: row, provider health, metrics, log."""
        now = self.clock.now()
        fields: dict[str, Any] = {
            "status": status,
            "error": error,
            "error_kind": kind.value if kind else None,
            "http_status": http_status,
            "latency_ms": ms(now - attempt.created_at),
            "cost_micro_usd": cost,
            "completed_at": now,
            **extra,
        }
        for key, value in fields.items():
            setattr(attempt, key, value)
        if provider is not None:
            provider.settle(ok=status == "completed", kind=kind,
                            latency_s=fields["latency_ms"] / 1000, retry_after_s=retry_after)
        assert attempt.id is not None
        if status == "completed" and not run.closed:
            run.pending[attempt.id] = fields  # written with the prediction's end
        else:
            await self.store.end_attempt(attempt, holds=run.holds, **fields)
        metrics.ATTEMPTS.labels(attempt.provider, kind.value if kind else status).inc()
        if cost:
            metrics.COST_MICRO_USD.labels(attempt.provider, run.pred.model).inc(cost)
            key_name = run.key.name if run.key else "none"
            metrics.COST_USD.labels(attempt.provider, run.pred.model, key_name).inc(
                cost / 1_000_000)
        log.info("attempt.finished", prediction_id=run.pred.id, provider=attempt.provider,
                 attempt=attempt.seq, upstream_id=attempt.upstream_id, status=status,
                 error_kind=fields["error_kind"], latency_ms=fields["latency_ms"],
                 cost_micro_usd=cost, api_key_id=run.pred.api_key_id)

    async def _cancel_upstream(self, provider: Admitted, job: UpstreamJob) -> None:
        if not provider.capabilities.cancel or job.status.terminal:
            return
        try:
            await provider.cancel(job)
        except ProviderError as exc:
            log.warning("attempt.cancel_failed", provider=provider.name,
                        upstream_id=job.upstream_id, error=exc.message)
