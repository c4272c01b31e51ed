""""A prediction ended": woken waiters in this process, and in every replica.

A sync-mode client (or an idempotent repeat) may wait on a prediction another
process drives: one taken over after this process lost its lease, or one a peer
admitted. On PostgreSQL the terminal write itself sends `pg_notify` in its
transaction (store/repo.py `_notify_done`); each process LISTENs on a connection
of its own and wakes the waiters of that id. On SQLite there is no channel between
processes: waiters are woken in-process, and read the store on a short timer for
the rest. A missed notification (the listener reconnecting) costs at most one
fallback interval: waiters re-read the store then, and every waiter re-reads when
the listener (re)connects.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from common.logging import get_logger
from proxy.lifecycle.run import Signal
from proxy.store.repo import DONE_CHANNEL

log = get_logger("flux_proxy.notify")
HEARTBEAT_S = 10.0  # a silent dead connection is found within this (+ its timeout)


class DoneNotifier:
    """Waiters by prediction id; `notify` wakes them. `listening`: another process's
    terminal write reaches us (PostgreSQL with a live LISTEN connection)."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[Signal]] = {}
        self.listening = False

    def watch(self, prediction_id: str) -> Signal:
        signal = Signal()
        self._waiters.setdefault(prediction_id, set()).add(signal)
        return signal

    def unwatch(self, prediction_id: str, signal: Signal) -> None:
        waiters = self._waiters.get(prediction_id)
        if waiters is not None:
            waiters.discard(signal)
            if not waiters:
                del self._waiters[prediction_id]

    def notify(self, prediction_id: str) -> None:
        for signal in self._waiters.get(prediction_id, ()):
            signal.set()

    def wake_all(self) -> None:
        for waiters in self._waiters.values():
            for signal in waiters:
                signal.set()

    @property
    def fallback_s(self) -> float:
        """How long a waiter sleeps between reads of the store."""
        return 5.0 if self.listening else 0.5

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class PgDoneNotifier(DoneNotifier):
    """LISTEN on `DONE_CHANNEL` over an asyncpg connection of its own, reconnecting
    with backoff; the payload is the prediction id."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self._dsn = dsn
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # tests wait on it

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="done-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notify(payload)

    async def _listen_forever(self) -> None:
        import asyncpg  # the PostgreSQL store's driver: present when the DSN is one

        backoff = 0.5
        while True:
            conn = None
            try:
                conn = await asyncio.wait_for(asyncpg.connect(self._dsn), timeout=10)
                await conn.add_listener(DONE_CHANNEL, self._on_notify)
                self.listening, backoff = True, 0.5
                self.connected.set()
                self.wake_all()  # what ended while we were not listening: read again
                while True:
                    await asyncio.sleep(HEARTBEAT_S)
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database restarting, a network blip
                log.warning("notify.listen_lost", error=f"{type(exc).__name__}: {exc}",
                            retry_in_s=backoff)
            finally:
                self.listening = False
                self.connected.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


def notifier_for(dsn: str | None) -> DoneNotifier:
    return PgDoneNotifier(dsn) if dsn else DoneNotifier()
