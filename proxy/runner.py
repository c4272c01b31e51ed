"""The lifecycle of one prediction: attempts across providers until terminal.

Every step is written to the store before the next begins, so a restarted
process resumes from the last recorded step: it polls an upstream id it
already has and never submits the same attempt twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tenacity import RetryError

from providers.base import (
    ErrorKind,
    GenerationRequest,
    JobStatus,
    Provider,
    ProviderError,
    UpstreamJob,
)

from . import metrics, outputs
from .logging import get_logger
from .polling import Canceled, wait_terminal
from .routing import Router
from .schema import generation_from_stored
from .store.models import Attempt, Prediction, utcnow
from .store.repo import Store

log = get_logger("flux_proxy.runner")


@dataclass(slots=True)
class Run:
    """A prediction this process is driving, mirrored in memory so sync-mode
    answers need no re-read."""

    pred: Prediction
    attempts: list[Attempt]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


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


def _ms(delta: timedelta) -> int:
    return max(0, int(delta.total_seconds() * 1000))


class Runner:
    def __init__(self, store: Store, router: Router, prediction_deadline_s: float) -> None:
        self.store = store
        self.router = router
        self.deadline = timedelta(seconds=prediction_deadline_s)

    # ------------------------------------------------------------------ bookkeeping

    async def _set_pred(self, run: Run, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(run.pred, key, value)
        await self.store.update_prediction(run.pred.id, **fields)

    async def _end_attempt(
        self,
        run: Run,
        attempt: Attempt,
        status: str,
        *,
        cost: int,
        error: str | None = None,
        kind: ErrorKind | None = None,
        http_status: int | None = None,
        **extra: Any,
    ) -> None:
        now = utcnow()
        fields: dict[str, Any] = {
            "status": status,
            "error": error,
            "error_kind": kind.value if kind else None,
            "http_status": http_status,
            "latency_ms": _ms(now - attempt.created_at),
            "cost_micro_usd": cost,
            "completed_at": now,
            **extra,
        }
        for key, value in fields.items():
            setattr(attempt, key, value)
        assert attempt.id is not None
        await self.store.update_attempt(attempt.id, **fields)
        metrics.ATTEMPTS.labels(attempt.provider, kind.value if kind else status).inc()
        if cost:
            metrics.COST_MICRO_USD.labels(attempt.provider, run.pred.model).inc(cost)
        log.info(
            "attempt.finished",
            prediction_id=run.pred.id,
            provider=attempt.provider,
            attempt=attempt.seq,
            upstream_id=attempt.upstream_id,
            status=status,
            error_kind=fields["error_kind"],
            latency_ms=fields["latency_ms"],
            cost_micro_usd=cost,
        )

    async def _finish(self, run: Run, status: str, outcome: Outcome | None) -> None:
        pred = run.pred
        now = utcnow()
        started = pred.started_at or now
        last = run.attempts[-1] if run.attempts else None
        timings = {
            "queue_ms": _ms(started - pred.created_at),
            "total_ms": _ms(now - pred.created_at),
        }
        if last is not None and last.latency_ms is not None:
            timings["upstream_ms"] = last.latency_ms
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
        if not await self.store.finish_prediction(pred.id, status=status, completed_at=now,
                                                  **fields):
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
        metrics.PREDICTIONS_FINISHED.labels(pred.model, provider_label, status).inc()
        metrics.PREDICTION_DURATION.labels(pred.model, provider_label, status).observe(
            timings["total_ms"] / 1000
        )
        log.info(
            "prediction.finished",
            prediction_id=pred.id,
            api_key_id=pred.api_key_id,
            provider=pred.provider,
            status=status,
            attempts=len(run.attempts),
            error_kind=pred.error_kind,
            cost_micro_usd=pred.cost_micro_usd,
            total_ms=timings["total_ms"],
        )

    # ------------------------------------------------------------------ the lifecycle

    async def drive(self, run: Run) -> None:
        try:
            await self._drive(run)
        except asyncio.CancelledError:
            raise  # shutdown: the lease lapses and the prediction resumes elsewhere
        except Exception as exc:  # a bug or a store outage must not leave it hanging
            log.exception("prediction.crashed", prediction_id=run.pred.id)
            try:
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
        if pred.status == "queued":
            await self._set_pred(run, status="processing", started_at=utcnow())
            log.info("prediction.processing", prediction_id=pred.id, api_key_id=pred.api_key_id)
        try:
            outcome = await self._resume_inflight(run, gen)
            if outcome is None or (not outcome.ok and outcome.retryable):
                outcome = await self._try_providers(run, gen, outcome)
        except Canceled:
            await self._finish(run, "canceled", Outcome(False, error="canceled by client"))
            return
        await self._finish(run, "completed" if outcome.ok else "failed", outcome)

    async def _resume_inflight(self, run: Run, gen: GenerationRequest) -> Outcome | None:
        last = run.attempts[-1] if run.attempts else None
        if last is None or last.status not in ("submitting", "processing"):
            return None
        provider = self.router.providers.get(last.provider)
        log.info(
            "attempt.resumed",
            prediction_id=run.pred.id,
            provider=last.provider,
            attempt=last.seq,
            upstream_id=last.upstream_id,
        )
        if last.status == "processing" and last.upstream_id and provider is not None:
            job = UpstreamJob(last.upstream_id, JobStatus.PROCESSING, poll_url=last.poll_url)
            return await self._follow(run, provider, last, gen, job)
        # Died between writing the attempt and learning the upstream id: a task
        # may exist there, so that provider is never asked again for this one.
        msg = "outcome unknown: the proxy stopped while submitting"
        cost = provider.attempt_cost_micro_usd(gen, None) if provider else 0
        await self._end_attempt(run, last, "unknown", cost=cost, error=msg,
                                kind=ErrorKind.OUTCOME_UNKNOWN)
        return Outcome(False, error=msg, kind=ErrorKind.OUTCOME_UNKNOWN)

    async def _try_providers(
        self, run: Run, gen: GenerationRequest, last: Outcome | None
    ) -> Outcome:
        tried = {a.provider for a in run.attempts}
        plan = self.router.plan(gen, exclude=tried)
        for provider in plan.providers:
            if run.cancel.is_set():
                raise Canceled
            if utcnow() >= run.pred.created_at + self.deadline:
                return Outcome(False, error="prediction deadline passed", kind=ErrorKind.TIMEOUT)
            last = await self._attempt(run, provider, gen)
            if last.ok or not last.retryable:
                return last
        if last is not None:
            return last
        why = plan.explain() or "no provider is enabled"
        return Outcome(False, error=f"no provider can serve this request ({why})",
                       kind=ErrorKind.UNAVAILABLE)

    async def _attempt(self, run: Run, provider: Provider, gen: GenerationRequest) -> Outcome:
        attempt = await self.store.add_attempt(
            Attempt(
                prediction_id=run.pred.id,
                seq=len(run.attempts) + 1,
                provider=provider.name,
                api_key_id=run.pred.api_key_id,
            )
        )
        run.attempts.append(attempt)
        log.info("attempt.submitting", prediction_id=run.pred.id, provider=provider.name,
                 attempt=attempt.seq)
        try:
            job = await provider.submit(gen)
        except ProviderError as exc:
            unknown = exc.kind is ErrorKind.OUTCOME_UNKNOWN
            await self._end_attempt(
                run,
                attempt,
                "unknown" if unknown else "failed",
                cost=provider.attempt_cost_micro_usd(gen, None) if unknown else 0,
                error=exc.message,
                kind=exc.kind,
                http_status=exc.status_code,
            )
            return Outcome(False, error=exc.message, kind=exc.kind)
        ids = {"upstream_id": job.upstream_id, "poll_url": job.poll_url}
        if job.status.terminal:  # answered synchronously: one write instead of two
            for key, value in ids.items():
                setattr(attempt, key, value)
            return await self._follow(run, provider, attempt, gen, job, extra=ids)
        for key, value in ids.items():
            setattr(attempt, key, value)
        assert attempt.id is not None
        await self.store.update_attempt(attempt.id, status="processing", **ids)
        attempt.status = "processing"
        log.info("attempt.accepted", prediction_id=run.pred.id, provider=provider.name,
                 attempt=attempt.seq, upstream_id=job.upstream_id)
        return await self._follow(run, provider, attempt, gen, job)

    async def _follow(
        self,
        run: Run,
        provider: Provider,
        attempt: Attempt,
        gen: GenerationRequest,
        job: UpstreamJob,
        extra: dict[str, Any] | None = None,
    ) -> Outcome:
        extra = extra or {}
        until = min(
            attempt.created_at + timedelta(seconds=provider.settings.deadline_s),
            run.pred.created_at + self.deadline,
        )
        try:
            if not job.status.terminal:
                job = await wait_terminal(provider, job, until, run.cancel)
        except Canceled:
            await self._cancel_upstream(provider, job)
            await self._end_attempt(run, attempt, "canceled", error="canceled by client",
                                    cost=provider.attempt_cost_micro_usd(gen, job), **extra)
            raise
        except RetryError:
            await self._cancel_upstream(provider, job)
            msg = f"no result from {provider.name} before the deadline"
            await self._end_attempt(run, attempt, "failed", error=msg, kind=ErrorKind.TIMEOUT,
                                    cost=provider.attempt_cost_micro_usd(gen, job), **extra)
            return Outcome(False, error=msg, kind=ErrorKind.TIMEOUT)
        except ProviderError as exc:
            await self._end_attempt(run, attempt, "failed", error=exc.message, kind=exc.kind,
                                    http_status=exc.status_code,
                                    cost=provider.attempt_cost_micro_usd(gen, job), **extra)
            return Outcome(False, error=exc.message, kind=exc.kind)

        cost = provider.attempt_cost_micro_usd(gen, job)
        if job.status is JobStatus.COMPLETED:
            try:
                outs, flags = await outputs.normalize(provider, gen, job)
            except ProviderError as exc:
                await self._end_attempt(run, attempt, "failed", error=exc.message,
                                        kind=exc.kind, cost=cost, **extra)
                return Outcome(False, error=exc.message, kind=exc.kind)
            await self._end_attempt(run, attempt, "completed", cost=cost, **extra)
            return Outcome(True, provider=provider.name, outputs=outs, nsfw=flags,
                           inference_ms=job.inference_ms)
        kind = job.error_kind or ErrorKind.UNAVAILABLE
        status = "canceled" if job.status is JobStatus.CANCELED else "failed"
        error = job.error or f"upstream job {job.raw_status or status}"
        await self._end_attempt(run, attempt, status, error=error, kind=kind,
                                http_status=None, cost=cost, **extra)
        return Outcome(False, error=error, kind=kind)

    async def _cancel_upstream(self, provider: Provider, job: UpstreamJob) -> None:
        if not provider.capabilities.cancel or job.status.terminal:
            return
        try:
            await provider.cancel(job)
        except ProviderError as exc:
            log.warning("attempt.cancel_failed", provider=provider.name,
                        upstream_id=job.upstream_id, error=exc.message)
