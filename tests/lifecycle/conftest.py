"""The lifecycle in-process: PredictionService on scripted providers, an
in-memory store, and virtual time (looptime + FakeClock), so minutes of upstream
waiting run in milliseconds and no socket is opened.

The store is `MemoryStore` (no thread, nothing for looptime to wait on);
tests/test_memory_store.py holds it to the SQL store's behaviour. Modules that
also open the database through Store objects of their own (crash points,
replicas) get the real SQLite store instead: `sqlite_store`."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from common.logging import configure_logging
from providers.testing import FakeClock, ScriptedProvider
from proxy.accounts.auth import Principal
from proxy.lifecycle.run import Run
from proxy.lifecycle.service import PredictionService
from proxy.routing import Router, RoutingSettings
from proxy.schema import GenerateRequest
from proxy.store import Store
from proxy.store.memory import MemoryStore
from proxy.store.models import ApiKey, Attempt, Prediction

# These modules share the harness's database with Stores of their own (a restart,
# a second replica), so their harness runs on a real SQLite file.
_REAL_DATABASE_MODULES = frozenset({"test_crash_points", "test_budget_bound"})
_FAST_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class LoopTimeStore:
    """The real Store, with each call marked as outside work for looptime.

    aiosqlite answers from its own thread; while a call is in flight looptime
    would otherwise see an idle loop and jump to the next timer. Holding an
    executor future for the call's duration keeps loop time still meanwhile.
    """

    def __init__(self, store: Store) -> None:
        self.inner = store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def call(*args: Any, **kwargs: Any) -> Any:
            loop = asyncio.get_running_loop()
            finished = threading.Event()
            marker = loop.run_in_executor(None, finished.wait, 5.0)
            try:
                return await attr(*args, **kwargs)
            finally:
                finished.set()
                await marker

        return call


@pytest.fixture
async def sqlite_store(template_db: Path) -> AsyncIterator[Store]:
    """The real Store on a migrated SQLite file (its engine: `.inner.engine`)."""
    # In memory-backed storage where there is one: each commit's fsync costs
    # milliseconds on disk, and these tests commit thousands of times.
    with tempfile.TemporaryDirectory(dir=_FAST_DIR) as folder:
        path = Path(folder) / "lifecycle.db"
        shutil.copy(template_db, path)
        real = Store(f"sqlite+aiosqlite:///{path}")
        yield LoopTimeStore(real)  # type: ignore[misc]
        await real.dispose()


@pytest.fixture
def store(request: pytest.FixtureRequest) -> Store:
    if request.module.__name__.rpartition(".")[2] in _REAL_DATABASE_MODULES:
        return cast(Store, request.getfixturevalue("sqlite_store"))
    return cast(Store, MemoryStore())


@dataclass
class Harness:
    store: Store
    clock: FakeClock
    services: list[PredictionService]

    def service(self, *providers: ScriptedProvider, deadline_s: float = 600.0,
                instance: str = "test-1", **routing: Any) -> PredictionService:
        """A service routing over `providers` in the given order (priority)."""
        settings = RoutingSettings.model_validate(
            {"order": [p.name for p in providers], **routing})
        router = Router({p.name: p for p in providers}, settings, clock=self.clock)
        service = PredictionService(self.store, router, instance_id=instance,
                                    prediction_deadline_s=deadline_s, clock=self.clock)
        self.services.append(service)
        return service

    async def rows(self, prediction_id: str) -> tuple[Prediction, list[Attempt]]:
        found = await self.store.get_with_attempts(prediction_id)
        assert found is not None
        return found


@pytest.fixture
async def harness(store: Store) -> AsyncIterator[Harness]:
    configure_logging("warning", "console")  # a line per state change is noise here
    h = Harness(store, FakeClock(), [])
    yield h
    for service in h.services:
        await service.stop()


def request(**fields: Any) -> GenerateRequest:
    return GenerateRequest.model_validate({"prompt": "a lighthouse at dusk", "seed": 7,
                                           "size": "1024*1024", **fields})


async def finished(service: PredictionService, run: Run, timeout_s: float = 3600.0) -> Run:
    """Wait (in virtual time) for the prediction to end."""
    assert await service.wait(run, timeout_s), f"still {run.pred.status} after {timeout_s}s"
    return run


def keyed(key: ApiKey) -> Principal:
    return Principal(key=key)


Waiter = Callable[[PredictionService, Run], Any]
