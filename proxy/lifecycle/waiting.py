"""Waiting for a prediction this process does not drive (an idempotent repeat of a
peer's, or one a peer took over): woken by the done notifier (lifecycle/notify.py),
reading the store on a fallback timer for what a notification cannot bring."""

from __future__ import annotations

import asyncio

from proxy.lifecycle.notify import DoneNotifier
from proxy.lifecycle.run import Run
from proxy.store import outage
from proxy.store.models import TERMINAL_STATUSES
from proxy.store.repo import Store

FIRST_READ_AFTER_S = 0.05  # the first re-read comes soon: the end may be a moment away


async def wait_elsewhere(store: Store, notifier: DoneNotifier, run: Run, timeout_s: float
                         ) -> bool:
    """Until `run`'s prediction is terminal (True, `run` refreshed from the store) or
    `timeout_s` passes (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    signal = notifier.watch(run.pred.id)
    delay = FIRST_READ_AFTER_S
    try:
        while True:
            signal.clear()
            try:
                found = await store.get_with_attempts(run.pred.id)
            except Exception as exc:  # the database restarting: keep waiting
                if not outage.is_outage(exc):
                    raise
                found = None
            if found is not None:
                run.pred, run.attempts = found[0], found[1]
                if run.pred.status in TERMINAL_STATUSES:
                    run.done.set()
                    return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await signal.sleep(min(delay, left))
            delay = min(delay * 2, notifier.fallback_s)
    finally:
        notifier.unwatch(run.pred.id, signal)
