"""One upstream attempt: write the row, submit, follow the job, record the outcome.

The attempt row is written before the POST and updated with the upstream id
right after, so a crash at any point is recoverable (runner.py resumes it).
Every outcome is fed back to the router (breaker, rate limits, latency).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tenacity import RetryError

from providers.base import (
    ErrorKind,
    GenerationRequest,
    JobStatus,
    OutcomeUnknown,
    Provider,
    ProviderError,
    UpstreamJob,
)

from . import metrics, outputs
from .logging import get_logger
from .polling import Canceled, wait_terminal
from .routing import Router
from .store.models import ApiKey, Attempt, Prediction, utcnow
from .store.repo import Store

log = get_logger("flux_proxy.attempts")


class CancelSignal(asyncio.Event):
    """Stops one attempt; `reason` goes on its row."""

    def __init__(self, reason: str = "canceled by client") -> None:
        super().__init__()
        self.reason = reason

    def fire(self, reason: str) -> None:
        self.reason = reason
        self.set()


@dataclass(slots=True)
class Run:
    """A prediction this process is driving, mirrored in memory so sync-mode
    answers need no re-read."""

    pred: Prediction
    attempts: list[Attempt]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: CancelSignal = field(default_factory=CancelSignal)
    task: asyncio.Task[None] | None = None
    key: ApiKey | None = None  # the client key that asked (None: admin or auth off)


@dataclass(slots=True)
class Outcome:
    ok: bool
    provider: str | None = None
    outputs: list[str] = field(default_factory=list)
    nsfw: list[bool] = field(default_factory=list)
    inference_ms: int | None = None
    error: str | None = None
    kind: ErrorKind | None = None

    @property
    def retryable(self) -> bool:
        return self.kind is None or self.kind.retryable


def ms(delta: timedelta) -> int:
    return max(0, int(delta.total_seconds() * 1000))


class Attempts:
    def __init__(self, store: Store, router: Router, deadline: timedelta) -> None:
        self.store = store
        self.router = router
        self.deadline = deadline

    def deadline_of(self, run: Run) -> datetime:
        return run.pred.created_at + self.deadline

    async def run(
        self, run: Run, provider: Provider, gen: GenerationRequest, cancel: CancelSignal,
        ticket: int | None = None,
    ) -> Outcome:
        """A new attempt on `provider`, under the router's `ticket`. Raises Canceled
        when `cancel` fires."""
        attempt = Attempt(prediction_id=run.pred.id, seq=len(run.attempts) + 1,
                          provider=provider.name, api_key_id=run.pred.api_key_id)
        run.attempts.append(attempt)  # seq is taken before any await: hedges never clash
        try:
            await self.store.add_attempt(attempt)
            return await self._submit_and_follow(run, provider, gen, cancel, attempt, ticket)
        finally:
            if attempt.completed_at is None:
                # Shutdown (or a store error) mid-attempt: give the ticket back.
                self.router.record(provider.name, ok=False, ticket=ticket)

    async def _submit_and_follow(
        self, run: Run, provider: Provider, gen: GenerationRequest, cancel: CancelSignal,
        attempt: Attempt, ticket: int | None,
    ) -> Outcome:
        log.info("attempt.submitting", prediction_id=run.pred.id, provider=provider.name,
                 attempt=attempt.seq, api_key_id=run.pred.api_key_id)
        remaining = (self.deadline_of(run) - utcnow()).total_seconds()
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
            await self.end(run, attempt, "unknown" if unknown else "failed",
                           cost=provider.attempt_cost_micro_usd(gen, None) if unknown else 0,
                           error=error, kind=exc.kind, http_status=exc.status_code,
                           retry_after=exc.retry_after, ticket=ticket)
            return Outcome(False, provider=provider.name, error=error, kind=exc.kind)
        ids = {"upstream_id": job.upstream_id, "poll_url": job.poll_url}
        for key, value in ids.items():
            setattr(attempt, key, value)
        if job.status.terminal:  # answered synchronously: one write instead of two
            return await self.follow(run, provider, attempt, gen, job, cancel, extra=ids,
                                     ticket=ticket)
        assert attempt.id is not None
        await self.store.update_attempt(attempt.id, status="processing", **ids)
        attempt.status = "processing"
        log.info("attempt.accepted", prediction_id=run.pred.id, provider=provider.name,
                 attempt=attempt.seq, upstream_id=job.upstream_id)
        return await self.follow(run, provider, attempt, gen, job, cancel, ticket=ticket)

    async def follow(
        self,
        run: Run,
        provider: Provider,
        attempt: Attempt,
        gen: GenerationRequest,
        job: UpstreamJob,
        cancel: CancelSignal,
        extra: dict[str, Any] | None = None,
        ticket: int | None = None,
    ) -> Outcome:
        """Wait for an accepted job to end, then record it."""
        extra = {**(extra or {}), "ticket": ticket}
        name = provider.name
        until = min(attempt.created_at + timedelta(seconds=provider.settings.deadline_s),
                    self.deadline_of(run))
        try:
            if not job.status.terminal:
                job = await wait_terminal(provider, job, until, cancel)
        except Canceled:
            await self._cancel_upstream(provider, job)
            await self.end(run, attempt, "canceled", error=cancel.reason,
                           cost=provider.attempt_cost_micro_usd(gen, job), **extra)
            raise
        except RetryError:
            await self._cancel_upstream(provider, job)
            msg = f"{name}: no result before the deadline"
            await self.end(run, attempt, "failed", error=msg, kind=ErrorKind.TIMEOUT,
                           cost=provider.attempt_cost_micro_usd(gen, job), **extra)
            return Outcome(False, provider=name, error=msg, kind=ErrorKind.TIMEOUT)
        except ProviderError as exc:
            await self.end(run, attempt, "failed", error=exc.message, kind=exc.kind,
                           http_status=exc.status_code,
                           cost=provider.attempt_cost_micro_usd(gen, job), **extra)
            return Outcome(False, provider=name, error=exc.message, kind=exc.kind)

        cost = provider.attempt_cost_micro_usd(gen, job)
        if job.status is JobStatus.COMPLETED:
            try:
                outs, flags = await outputs.normalize(provider, gen, job)
            except ProviderError as exc:
                await self.end(run, attempt, "failed", error=exc.message, kind=exc.kind,
                               cost=cost, **extra)
                return Outcome(False, provider=name, error=exc.message, kind=exc.kind)
            await self.end(run, attempt, "completed", cost=cost, images=len(outs), **extra)
            metrics.IMAGES.labels(name).inc(len(outs))
            return Outcome(True, provider=name, outputs=outs, nsfw=flags,
                           inference_ms=job.inference_ms)
        kind = job.error_kind or ErrorKind.UNAVAILABLE
        status = "canceled" if job.status is JobStatus.CANCELED else "failed"
        error = job.error or f"upstream job {job.raw_status or status}"
        await self.end(run, attempt, status, error=error, kind=kind, cost=cost, **extra)
        return Outcome(False, provider=name, error=error, kind=kind)

    async def end(
        self,
        run: Run,
        attempt: Attempt,
        status: str,
        *,
        cost: int,
        error: str | None = None,
        kind: ErrorKind | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
        ticket: int | None = None,
        **extra: Any,
    ) -> None:
        """Record a finished attempt: row, router health, metrics, log."""
        now = utcnow()
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
        ok = status == "completed"
        self.router.record(attempt.provider, ok=ok, kind=kind,
                           latency_s=fields["latency_ms"] / 1000, retry_after_s=retry_after,
                           ticket=ticket)
        assert attempt.id is not None
        await self.store.update_attempt(attempt.id, **fields)
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

    async def _cancel_upstream(self, provider: Provider, job: UpstreamJob) -> None:
        if not provider.capabilities.cancel or job.status.terminal:
            return
        try:
            await provider.cancel(job)
        except ProviderError as exc:
            log.warning("attempt.cancel_failed", provider=provider.name,
                        upstream_id=job.upstream_id, error=exc.message)
