"""What an output store is made of: a backend that writes, reads and sweeps images.

One object per output, named by its prediction id and 0-based index. The backend is
the record: what it holds (its bytes, content type and time written) is all the
proxy needs to serve it, so there is no database row to keep in step with it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from common import media

# Prediction ids (proxy/store/models.py new_id): the only names a backend accepts, so a
# path or an object key can never be steered by a request.
PREDICTION_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MAX_OUTPUTS = 16  # indexes a backend accepts (num_images is 1..4)
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif"}
CHUNK = 256 * 1024  # bytes per read when serving
WRITE_BUFFER = 1024 * 1024  # bytes gathered before each write to the store's file


async def put_whole(backend: Backend, prediction_id: str, n: int, data: bytes,
                    fmt: str) -> None:
    """Store the bytes of output `n` (an image of `fmt`) at once, complete or not at
    all, by way of the backend's writer. Raises StoreError."""
    out = await backend.writer(prediction_id, n)
    try:
        await out.write(data)
        await out.commit(fmt)
    except BaseException:
        await out.abort()
        raise


class StoreError(Exception):
    """A backend could not write, read or delete (disk full, bucket unreachable)."""


def valid_name(prediction_id: str, n: int) -> bool:
    return bool(PREDICTION_ID.match(prediction_id)) and 0 <= n < MAX_OUTPUTS


def content_type(fmt: str) -> str:
    return media.MIME_TYPES[fmt]


@dataclass
class Blob:
    """One stored output, opened: its metadata, and its bytes as chunks (read once)."""

    content_type: str
    size: int
    created: float  # unix seconds, when it was written
    chunks: AsyncIterator[bytes]
    # Releases what `chunks` holds (a file, a connection) when it is not read to the
    # end; an async generator never started would not run its own `finally`.
    release: Callable[[], Awaitable[None]] | None = None

    async def aclose(self) -> None:
        if self.release is not None:
            await self.release()


class Writer(Protocol):
    """One output being written, a chunk at a time; it appears (complete) at `commit`,
    or not at all after `abort`. Every method may raise StoreError."""

    async def write(self, chunk: bytes) -> None: ...

    async def commit(self, fmt: str) -> None: ...

    async def abort(self) -> None: ...


class Backend(Protocol):
    """Where outputs live. Names are checked with `valid_name` before any call."""

    description: str  # for logs: a folder or s3://bucket/prefix, never a credential

    async def writer(self, prediction_id: str, n: int) -> Writer:
        """Start writing output `n`. Raises StoreError."""
        ...


    async def get(self, prediction_id: str, n: int) -> Blob | None:
        """Output `n`, opened for reading; None when there is none."""
        ...

    async def sweep(self, cutoff: float, max_entries: int) -> int:
        """Delete outputs written before `cutoff` (unix seconds), looking at no more
        than `max_entries` entries; the next call goes on where this one stopped.
        Returns how many were deleted."""
        ...

    async def aclose(self) -> None: ...
