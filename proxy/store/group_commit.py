"""Group commit: the lifecycle writes of many predictions in one transaction.

Each write is an operation on a session; callers queue theirs and wait. One
writer task per store takes everything queued and commits it together, so
200 predictions finishing at once cost a few transactions instead of 200
(one fsync, one BEGIN/COMMIT, one connection checkout each). A caller hears
back only after the COMMIT: the durability rules of the lifecycle do not
change (a row is committed before the client hears of it).

If a batch fails, no write of it is kept, and each is run again alone in its
own transaction, so one bad write (a constraint, a budget refusal) fails only
its own caller. Operations must therefore be safe to run twice when the
first run was rolled back: they build their statements from their arguments.

Operations are synchronous functions of a `Session`: on PostgreSQL a batch runs
in one `run_sync` call on an async session; on a SQLite file it runs in ONE hop to
a writer thread with its own connection (no per-statement thread hand-offs, which
were most of a write's cost through aiosqlite).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.logging import get_logger
from proxy.store._tables import Tx

T = TypeVar("T")
Op = Callable[[Tx], Any]
log = get_logger("flux_proxy.store")

MAX_BATCH = 128  # bounds one transaction's length (and how long its lock is held)


class GroupCommit:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], *,
                 max_batch: int = MAX_BATCH,
                 writer_engine: Callable[[], Engine] | None = None) -> None:
        """`writer_engine`: a synchronous engine (made on first use) whose
        connection a dedicated thread writes through; None: the async sessions."""
        self._sessions = sessions
        self._max = max_batch
        self._make_engine = writer_engine
        self._engine: Engine | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._queue: deque[tuple[Op, asyncio.Future[Any]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # transactions committed (for tests and benchmarks)
        self.writes = 0  # operations in them

    async def run(self, op: Callable[[Tx], T]) -> T:
        """Queue `op` and wait until the transaction that ran it has committed;
        its result, or the exception it raised when run alone."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((op, future))
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._writer(), name="group-commit")
        self._wake.set()
        return await future

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await task
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.shutdown)
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()

    async def _execute(self, ops: list[Op]) -> list[Any]:
        """Run `ops` in one transaction, committed when this returns."""
        if self._make_engine is None:
            async with self._sessions() as session, session.begin():
                return await session.run_sync(_run_all, ops)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="flux-store-writer")
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._in_thread,
                                                                ops)

    def _in_thread(self, ops: list[Op]) -> list[Any]:
        if self._engine is None:
            assert self._make_engine is not None
            self._engine = self._make_engine()
        with self._engine.begin() as conn:  # Core only: no ORM session per batch
            return _run_all(conn, ops)

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                # Let the other writers of this turn of the loop queue theirs first.
                await asyncio.sleep(0)
                batch = [self._queue.popleft()
                         for _ in range(min(len(self._queue), self._max))]
                await self._commit(batch)

    async def _commit(self, batch: list[tuple[Op, asyncio.Future[Any]]]) -> None:
        live = [(op, f) for op, f in batch if not f.done()]  # a canceled caller: not written
        if not live:
            return
        try:
            results = await self._execute([op for op, _ in live])
        except Exception as exc:
            if len(live) > 1:  # one bad write must not fail the others: each alone
                log.info("group_commit.split", writes=len(live))
                for one in live:
                    await self._commit([one])
            elif not live[0][1].done():
                live[0][1].set_exception(exc)
            return
        except BaseException as exc:  # cancelled mid-commit: the callers must not hang
            for _, future in live:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(
                        "the store's writer stopped"))
            raise
        self.batches += 1
        self.writes += len(live)
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result(result)


def _run_all(session: Tx, ops: list[Op]) -> list[Any]:
    return [op(session) for op in ops]
