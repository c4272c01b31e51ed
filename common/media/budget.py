"""Process-wide budgets of bytes in memory: what bounds the sum, not just one.

``max_download_bytes`` bounds one download; nothing bounded how many run at once,
so 32 concurrent base64 downloads of a hostile 100 MiB body held 32 x 32 MiB. A
:class:`ByteBudget` is an exact, first-come-first-served async semaphore counted
in bytes: a reservation waits until it fits, and one that can never fit (more
than the whole budget) fails at once with :class:`OverBudget`.

Two budgets, one per kind of memory (both sized by ``proxy.config.Settings``,
``configure`` applies them at start):

``downloads()`` (``max_inflight_download_bytes``)
    Bodies of downloads held in memory. A download reserves, once its response
    headers are in, its declared Content-Length (or, for a body without one,
    ``max_bytes``), in one piece, before reading a byte of the body, and reads
    the body into one buffer of exactly that size (never grown, so no realloc
    copies); what the body did not use is returned when it ends. Exact.
``decoding()`` (``max_inflight_decode_bytes``)
    Working memory of decoding and encoding images: an output's pixels
    (measured bytes per pixel, :func:`~common.media.decode_cost`) and its data
    URI; a request's inline image (payload, decoded bytes and pixels). Reserved
    before the work, in one piece, returned after it.

Why whole reservations, not one per chunk: a download that holds part of the
budget and waits for more, while others do the same, can wait forever (each
waits for the others to finish; only the timeouts end it). Here a waiter holds
nothing of the budget it waits for, and the only wait while holding is from a
download's bytes for decoding memory, never the other way round, and decoding
never waits once it has its bytes. So every wait ends when some work finishes:
no deadlock, and FIFO order means no starvation of large reservations.

What the budgets do not count: the finished data URI once the encoder hands it
over (it belongs to the answer being built), Python's own per-connection state,
and the allocator's slack; tests/test_memory_bounds.py measures that margin.

A download keeps its bytes reserved after it returns only inside
:func:`holding`, which the caller that keeps the bytes opens around the call
(outputs are held until their data URI is built). It travels in a context
variable, so it crosses ``Provider.download`` and its wrappers unchanged.

Why not anyio's ``CapacityLimiter`` or ``asyncio.Semaphore``: both count tokens
one at a time; acquiring a byte count as N tokens is not atomic (two large
reservations can each take half and wait forever: the deadlock above).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

from ._errors import MediaError, TooLarge

MiB = 1024 * 1024
DEFAULT_DOWNLOAD_BYTES = 256 * MiB
DEFAULT_DECODE_BYTES = 320 * MiB

T = TypeVar("T")


class OverBudget(TooLarge):
    """A reservation larger than the whole budget: it could never be granted."""


class BudgetWait(MediaError):
    """A reservation waited longer than allowed: the budget stayed in use."""


class _Waiter:
    __slots__ = ("future", "granted", "loop", "n")

    def __init__(self, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.n = n
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.granted = False


class ByteBudget:
    """An exact FIFO semaphore of bytes, safe to share across event loops and threads.

    ``name`` is the setting that sizes it, for messages (``max_inflight_download_bytes``).
    """

    def __init__(self, capacity: int, *, name: str = "budget") -> None:
        if capacity < 1:
            raise ValueError("a byte budget needs a capacity of at least 1 byte")
        self.name = name
        self._capacity = capacity
        self._in_use = 0
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    def __repr__(self) -> str:
        return (f"ByteBudget({self.name}: {self._in_use}/{self._capacity} bytes, "
                f"{len(self._waiters)} waiting)")

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def resize(self, capacity: int) -> None:
        """Change the capacity (at start). Holders keep what they have; a waiter that
        can no longer ever fit is failed with :class:`OverBudget`."""
        if capacity < 1:
            raise ValueError("a byte budget needs a capacity of at least 1 byte")
        with self._lock:
            self._capacity = capacity
            doomed = [w for w in self._waiters if w.n > capacity]
            for w in doomed:
                self._waiters.remove(w)
        for w in doomed:
            _settle(w, self._never_fits(w.n, "reservation"))
        self._wake()

    def _never_fits(self, n: int, what: str) -> OverBudget:
        return OverBudget(f"{what} needs {n} bytes of memory, more than this process's whole "
                          f"{self.name} ({self._capacity} bytes)")

    async def acquire(self, n: int, *, what: str = "reservation") -> None:
        """Wait until ``n`` bytes fit, first come first served; :class:`OverBudget`
        at once when ``n`` exceeds the capacity. Cancellation-safe: a cancelled
        wait holds nothing."""
        if n < 0:
            raise ValueError("cannot reserve a negative number of bytes")
        if n == 0:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            if n > self._capacity:
                raise self._never_fits(n, what)
            if not self._waiters and self._in_use + n <= self._capacity:
                self._in_use += n
                return
            waiter = _Waiter(n, loop)
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                granted = waiter.granted
                if not granted and waiter in self._waiters:
                    self._waiters.remove(waiter)
            if granted:
                self.release(n)
            else:
                self._wake()  # a head waiter leaving may let the next ones in
            raise

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes only if they fit now and nobody is waiting."""
        with self._lock:
            if n <= 0:
                return True
            if not self._waiters and self._in_use + n <= self._capacity:
                self._in_use += n
                return True
            return False

    def release(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            if n > self._in_use:
                raise RuntimeError(f"{self.name}: released {n} bytes, only {self._in_use} held")
            self._in_use -= n
        self._wake()

    @asynccontextmanager
    async def reserve(self, n: int, *, what: str = "reservation") -> AsyncIterator[None]:
        """``async with budget.reserve(n):`` holds ``n`` bytes for the block."""
        await self.acquire(n, what=what)
        try:
            yield
        finally:
            self.release(n)

    async def run(self, n: int, fn: Callable[..., T], /, *args: Any, what: str = "reservation",
                  wait_s: float | None = None, **kwargs: Any) -> T:
        """Reserve ``n`` bytes (waiting at most ``wait_s``: :class:`BudgetWait`), then
        :meth:`run_holding` ``fn`` in a worker thread."""
        try:
            async with asyncio.timeout(wait_s):
                await self.acquire(n, what=what)
        except TimeoutError as exc:
            raise BudgetWait(
                f"{what} waited {wait_s:g}s for memory: this process's {self.name} "
                f"({self._capacity} bytes) stayed in use") from exc
        return await self.run_holding(n, fn, *args, **kwargs)

    async def run_holding(self, n: int, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a worker thread; the ``n`` bytes the caller
        already acquired are released when the thread finishes, not before, even
        if the caller stops waiting (a thread cannot be cancelled: its memory is in
        use until it returns)."""

        def job() -> T:
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                # Its traceback would keep fn's locals (the image) alive after the
                # bytes are returned to the budget.
                traceback.clear_frames(exc.__traceback__)
                raise
            finally:
                self.release(n)

        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        try:
            future = loop.run_in_executor(None, functools.partial(context.run, job))
        except BaseException:
            self.release(n)
            raise
        # A caller that stopped waiting leaves the result unread: read it here.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(future)

    def _wake(self) -> None:
        granted: list[_Waiter] = []
        with self._lock:
            while self._waiters and self._in_use + self._waiters[0].n <= self._capacity:
                waiter = self._waiters.popleft()
                waiter.granted = True
                self._in_use += waiter.n
                granted.append(waiter)
        for waiter in granted:
            if not _settle(waiter, None):
                self.release(waiter.n)  # its loop is gone: nobody will use or return it


def _settle(waiter: _Waiter, error: BaseException | None) -> bool:
    """Resolve a waiter's future from any thread; False when its loop is closed."""

    def settle() -> None:
        if not waiter.future.done():
            if error is None:
                waiter.future.set_result(None)
            else:
                waiter.future.set_exception(error)

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is waiter.loop:
        settle()
        return True
    try:
        waiter.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed
        return False
    return True


class Claim:
    """Bytes one piece of work holds from a budget, returned together at the end."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0
        self.gave_up_waiting = False  # a reserve() was cancelled (a timeout) while it waited

    async def reserve(self, n: int, *, what: str = "reservation") -> None:
        """Add ``n`` bytes (waiting for them). Deadlock-free only while this claim
        holds nothing yet: reserve the whole need at once."""
        try:
            await self.budget.acquire(n, what=what)
        except asyncio.CancelledError:
            self.gave_up_waiting = True
            raise
        self.held += n

    def give_back(self, n: int) -> None:
        n = min(n, self.held)
        if n > 0:
            self.held -= n
            self.budget.release(n)

    def release(self) -> None:
        self.give_back(self.held)


_HELD: contextvars.ContextVar[Claim | None] = contextvars.ContextVar(
    "common_media_held_claim", default=None)


@contextmanager
def holding(budget: ByteBudget | None = None) -> Iterator[Claim]:
    """Keep what downloads reserve inside this block until it ends.

    ``with holding() as claim: data, _ = await download(...)``: the body stays
    counted while ``data`` is in use; ``claim.release()`` earlier once it is not.
    """
    claim = Claim(budget if budget is not None else downloads())
    token = _HELD.set(claim)
    try:
        yield claim
    finally:
        _HELD.reset(token)
        claim.release()


def held_claim(budget: ByteBudget) -> Claim | None:
    """The claim an enclosing :func:`holding` opened for ``budget``, if any."""
    claim = _HELD.get()
    return claim if claim is not None and claim.budget is budget else None


_DOWNLOADS = ByteBudget(DEFAULT_DOWNLOAD_BYTES, name="max_inflight_download_bytes")
_DECODING = ByteBudget(DEFAULT_DECODE_BYTES, name="max_inflight_decode_bytes")


def downloads() -> ByteBudget:
    """The process-wide budget of download bodies in memory."""
    return _DOWNLOADS


def decoding() -> ByteBudget:
    """The process-wide budget of image decoding / encoding memory."""
    return _DECODING


def configure(*, download_bytes: int | None = None, decode_bytes: int | None = None) -> None:
    """Size the process-wide budgets (``flux-proxy serve`` does, from the settings)."""
    if download_bytes is not None:
        _DOWNLOADS.resize(download_bytes)
    if decode_bytes is not None:
        _DECODING.resize(decode_bytes)
