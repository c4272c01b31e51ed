"""Outputs in a local folder (one every process and replica that mounts it shares).

Layout, sharded by the id's last two hex digits (random bits of a UUIDv7; its first
ones are the time, the same for everything made in a day)::

    <root>/<id[-2:]>/<id>/<n>.<ext>         output n, complete
    <root>/<id[-2:]>/<id>/.<n>.<tag>.tmp    being written

A file is streamed to a temporary name, flushed to disk and renamed into place, so
a reader never sees half an image, and it is on disk before the prediction's end is
committed. Its modification time is when it was written: the retention clock.
Blocking I/O runs in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from proxy.outputs_store.backend import (
    CHUNK,
    EXTENSIONS,
    WRITE_BUFFER,
    Blob,
    StoreError,
    content_type,
)

_FORMATS = {ext: fmt for fmt, ext in EXTENSIONS.items()}
SHARDS = 256


def folder_of(value: str) -> Path:
    """`output_store` as a folder: a path, or a file:// URL."""
    if value.startswith("file://"):
        value = value.removeprefix("file://")
    return Path(value).expanduser()


class LocalFolder:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.description = str(self.root)
        self._cursor = random.randrange(SHARDS)  # replicas start their sweeps apart

    def _dir(self, prediction_id: str) -> Path:
        return self.root / prediction_id[-2:] / prediction_id

    async def writer(self, prediction_id: str, n: int) -> _FileWriter:
        def start() -> _FileWriter:
            folder = self._dir(prediction_id)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{n}.{secrets.token_hex(4)}.tmp"
            return _FileWriter(self.description, folder, n, tmp, open(tmp, "xb"))

        return await _io(self.description, "write to", start)

    async def get(self, prediction_id: str, n: int) -> Blob | None:
        try:
            opened = await asyncio.to_thread(self._open, prediction_id, n)
        except OSError as exc:  # permissions, an I/O error: not "no such output"
            raise StoreError(f"could not read {self.description}: "
                             f"{type(exc).__name__}: {exc.strerror or exc}") from exc
        if opened is None:
            return None
        fh, fmt, size, created = opened

        async def release() -> None:
            fh.close()

        return Blob(content_type=content_type(fmt), size=size, created=created,
                    chunks=_read(fh), release=release)

    def _open(self, prediction_id: str, n: int) -> tuple[BinaryIO, str, int, float] | None:
        folder = self._dir(prediction_id)
        for ext, fmt in _FORMATS.items():
            try:
                # Opened now: a sweep that deletes it meanwhile cannot cut the answer short.
                fh = open(folder / f"{n}.{ext}", "rb")  # noqa: SIM115 (closed by _read)
            except (FileNotFoundError, NotADirectoryError):
                continue
            stat = os.fstat(fh.fileno())
            return fh, fmt, stat.st_size, stat.st_mtime
        return None

    async def sweep(self, cutoff: float, max_entries: int) -> int:
        return await asyncio.to_thread(self._sweep, cutoff, max_entries)

    def _sweep(self, cutoff: float, max_entries: int) -> int:
        """Shards in turn from where the last sweep stopped; in each, every prediction's
        folder: files written before `cutoff` go (half-written ones too), then the
        folder if it is empty."""
        removed = seen = 0
        for _ in range(SHARDS):
            shard = self.root / f"{self._cursor:02x}"
            self._cursor = (self._cursor + 1) % SHARDS
            try:
                folders = list(os.scandir(shard))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for folder in folders:
                try:
                    files = list(os.scandir(folder.path))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                seen += 1 + len(files)
                for entry in files:
                    with contextlib.suppress(FileNotFoundError):
                        if entry.is_file(follow_symlinks=False) and (
                                entry.stat(follow_symlinks=False).st_mtime < cutoff):
                            os.unlink(entry.path)
                            removed += 1
                with contextlib.suppress(OSError):  # not empty: it has newer outputs
                    os.rmdir(folder.path)
            if seen >= max_entries:
                break
        return removed

    async def aclose(self) -> None:
        return None


T = TypeVar("T")


async def _io(where: str, what: str, fn: Callable[[], T]) -> T:
    """`fn` in a worker thread, an OSError (disk full, permissions) as StoreError."""
    try:
        return await asyncio.to_thread(fn)
    except OSError as exc:
        raise StoreError(f"could not {what} {where}: "
                         f"{type(exc).__name__}: {exc.strerror or exc}") from exc


class _FileWriter:
    """Chunks gathered up to WRITE_BUFFER, then written under a temporary name; at
    commit flushed to disk and renamed into place (a reader never sees half)."""

    def __init__(self, where: str, folder: Path, n: int, tmp: Path, fh: BinaryIO) -> None:
        self._where, self._folder, self._n, self._tmp, self._fh = where, folder, n, tmp, fh
        self._buffer = bytearray()

    async def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        if len(self._buffer) >= WRITE_BUFFER:
            await self._flush_buffer()

    async def _flush_buffer(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        await _io(self._where, "write to", lambda: self._fh.write(data))

    async def commit(self, fmt: str) -> None:
        await self._flush_buffer()
        await _io(self._where, "write to", lambda: self._finish(fmt))

    def _finish(self, fmt: str) -> None:
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            # A resumed prediction may copy its outputs again: the newer file wins.
            for other in EXTENSIONS.values():
                if other != EXTENSIONS[fmt]:
                    with contextlib.suppress(FileNotFoundError):
                        (self._folder / f"{self._n}.{other}").unlink()
            os.replace(self._tmp, self._folder / f"{self._n}.{EXTENSIONS[fmt]}")
        finally:
            self._drop()

    async def abort(self) -> None:
        self._buffer = bytearray()
        await asyncio.to_thread(self._drop)

    def _drop(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


async def _read(fh: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(fh.read, CHUNK):
            yield chunk
    finally:
        fh.close()
