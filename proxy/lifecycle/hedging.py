"""Hedged attempts: when the first is slow, start the same request on a backup
and take the first result; the loser is canceled where its upstream allows,
and both attempts keep their cost."""

from __future__ import annotations

import asyncio
import contextlib

from common.logging import get_logger
from providers.base import GenerationRequest, Provider
from proxy import metrics
from proxy.lifecycle.attempts import Attempts
from proxy.lifecycle.polling import Canceled
from proxy.lifecycle.run import CancelSignal, Outcome, Run
from proxy.lifecycle.waste import HEDGE_LOST_PREFIX, count_waste
from proxy.routing.admission import Admitted

log = get_logger("flux_proxy.hedging")


async def propagate(source: CancelSignal, targets: list[CancelSignal]) -> None:
    await source.wait()
    for target in targets:
        target.fire(source.reason)


async def hedged(
    attempts: Attempts,
    run: Run,
    first: Admitted,
    gen: GenerationRequest,
    delay_s: float,
    backups: list[Provider],
) -> Outcome:
    signals = [CancelSignal()]
    tasks: dict[asyncio.Task[Outcome], CancelSignal] = {
        asyncio.create_task(attempts.run(run, first, gen, signals[0])): signals[0]
    }
    watcher = asyncio.create_task(propagate(run.cancel, signals))
    try:
        done, _ = await asyncio.wait(tasks, timeout=delay_s)
        if not done:
            second = None
            for backup in backups:
                second = attempts.router.acquire(backup.name)
                if second is not None:
                    break
            if second is not None:
                metrics.HEDGES.labels(first.name).inc()
                log.info("attempt.hedged", prediction_id=run.pred.id, provider=first.name,
                         backup=second.name, after_s=round(delay_s, 3))
                signal = CancelSignal()
                signals.append(signal)
                tasks[asyncio.create_task(
                    attempts.run(run, second, gen, signal))] = signal
            outcome = await first_result(attempts, run, tasks)
            if second is not None:
                won = outcome.ok and outcome.provider == second.name
                metrics.HEDGE_RESULTS.labels(first.name, "won" if won else "lost").inc()
            return outcome
        return await first_result(attempts, run, tasks)
    finally:
        watcher.cancel()


async def first_result(
    attempts: Attempts, run: Run, tasks: dict[asyncio.Task[Outcome], CancelSignal]
) -> Outcome:
    pending = set(tasks)
    last: Outcome | None = None
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            try:
                outcome = task.result()
            except Canceled:
                if run.cancel.is_set():
                    await _settle(pending)
                    raise
                continue
            if outcome.ok or not outcome.retryable:
                for other in pending:
                    tasks[other].fire(f"{HEDGE_LOST_PREFIX}: {outcome.provider} answered first")
                if pending:
                    _settle_later(attempts, run, pending)
                return outcome
            last = outcome
    assert last is not None
    return last


async def _settle(pending: set[asyncio.Task[Outcome]]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.gather(*pending, return_exceptions=True)


_background: set[asyncio.Task[None]] = set()


def _settle_later(attempts: Attempts, run: Run, losers: set[asyncio.Task[Outcome]]) -> None:
    """The client gets the winner now; a loser still inside its submit cannot be
    stopped without losing its upstream id, so it ends in the background, and
    then its cost is added to the (already finished) prediction."""

    async def settle() -> None:
        await _settle(losers)
        await run.done.wait()  # after the runner wrote the prediction's final row
        count_waste(run, run.delivered)  # the losers that ended only now
        total = sum(a.cost_micro_usd for a in run.attempts)
        if total != run.pred.cost_micro_usd:
            run.pred.cost_micro_usd = total
            await attempts.store.update_prediction(run.pred.id, cost_micro_usd=total)
        log.info("hedge.settled", prediction_id=run.pred.id, cost_micro_usd=total)

    task = asyncio.create_task(settle(), name=f"hedge-settle-{run.pred.id}")
    _background.add(task)
    task.add_done_callback(_background.discard)
