"""Telling a database outage (a restart, a dropped connection, a locked SQLite file)
from a bug, and riding one out where a write must not be lost.

An outage is worth waiting for: the rows say what happened so far, and the work
resumes from them once the database answers. A bug (a constraint violated, bad SQL)
is not, and still fails the prediction that hit it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

T = TypeVar("T")
# A write that must not be lost (an upstream id, a prediction's end) waits this long.
WRITE_RETRY_S = 20.0


def is_outage(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError):
        return not isinstance(exc, IntegrityError | DataError | ProgrammingError)
    return isinstance(exc, ConnectionError | TimeoutError)


async def retrying(op: Callable[[], Awaitable[T]], within_s: float = WRITE_RETRY_S) -> T:
    """`op()`, again after an outage (0.1 s doubling to 2 s), for at most `within_s`;
    then the last outage is raised. Only for writes that are safe to repeat."""
    async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_outage), wait=wait_exponential(multiplier=0.1, max=2.0),
            stop=stop_after_delay(within_s), reraise=True):
        with attempt:
            return await op()
    raise AssertionError("unreachable")  # tenacity either returns or raises
