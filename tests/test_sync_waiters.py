"""Sync-mode waiters are woken wherever the prediction ends: on PostgreSQL the
terminal write NOTIFYs every replica (LISTEN on a connection of each process's own),
so a client waiting on replica A hears of a prediction replica B finished, after a
takeover or as an idempotent repeat; a process that lost its lease stops driving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from providers.simulators import SimulatorServer
from proxy.lifecycle.notify import PgDoneNotifier
from proxy.store import Prediction, Store

from ._serve import Served, pg_database, query, serve_process, write_config

# A job ending between the fallback reads of a waiter that began with it (about 3.2 s
# and 6.4 s in): woken by NOTIFY it answers near SLOW_S, by reads alone near 6.4 s.
SLOW_S = 3.3
BODY = {"prompt": f"a lighthouse [sim:latency={SLOW_S}]", "size": "1024*1024"}


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


def execute(database_url: str, sql: str) -> None:
    async def run() -> None:
        engine = create_async_engine(database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    asyncio.run(run())


def two_replicas(tmp_path: Path, sim: SimulatorServer, url: str, *, lease_s: float = 30.0
                 ) -> tuple[Path, Path]:
    configs = []
    for name in ("a", "b"):
        config = tmp_path / f"{name}.toml"
        write_config(config, sim, url, lease_s=lease_s)
        configs.append(config)
    return configs[0], configs[1]


def finished_by(served: Served, pred_id: str) -> bool:
    return any(e.get("prediction_id") == pred_id
               for e in served.events("prediction.finished"))


# --------------------------------------------------------------------------- the listener


async def test_a_terminal_write_on_one_store_wakes_a_listener_of_another(pg_url: str) -> None:
    """Two stores on one database stand for two replicas; the NOTIFY goes with the
    commit of the terminal write, and only a write that ended the prediction sends it."""
    async with Store(pg_url) as writer, Store(pg_url) as reader:
        await writer.upgrade()
        notifier = PgDoneNotifier(reader.listen_dsn() or "")
        await notifier.start()
        try:
            await asyncio.wait_for(notifier.connected.wait(), timeout=10)
            pred = await writer.create_prediction(Prediction(model="flux-dev", request={},
                                                             seed=1))
            woken = notifier.watch(pred.id)
            assert not await woken.sleep(0.3)  # nothing ended yet
            assert await writer.finish_prediction(pred.id, status="completed", outputs=[])
            assert await woken.sleep(5.0), "the NOTIFY never arrived"
            woken.clear()
            # Already terminal: nothing changes, nothing is sent.
            assert not await writer.finish_prediction(pred.id, status="failed")
            assert not await woken.sleep(0.5)

            # The listener's connection dies (a database restart): it reconnects and
            # hears the next end.
            await writer.engine.dispose()
            async with writer.engine.connect() as conn:
                await conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"))
                await conn.commit()
            for _ in range(200):  # bounded: the reconnect backoff starts at 0.5 s
                if not notifier.listening:
                    break
                await asyncio.sleep(0.05)
            await asyncio.wait_for(notifier.connected.wait(), timeout=20)
            other = await writer.create_prediction(Prediction(model="flux-dev", request={},
                                                              seed=2))
            again = notifier.watch(other.id)
            await writer.finish_prediction(other.id, status="canceled")
            assert await again.sleep(5.0)
        finally:
            await notifier.stop()


# --------------------------------------------------------------------------- two replicas


def test_a_repeat_waiting_on_replica_a_is_woken_when_b_finishes(
    tmp_path: Path, vibedream_sim: SimulatorServer, pg_url: str
) -> None:
    """Submitted on B, repeated in sync mode on A (same Idempotency-Key): A drives
    nothing and is told by B's NOTIFY, not by its 5 s fallback read."""
    config_a, config_b = two_replicas(tmp_path, vibedream_sim, pg_url)
    with serve_process(config_a, tmp_path, workers=1) as a, \
            serve_process(config_b, tmp_path, workers=1) as b:
        headers = {"Idempotency-Key": "cross-replica-1"}
        body = {**BODY, "enable_sync_mode": True}
        started = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            on_b = pool.submit(httpx.post, f"{b.base}/v1/predictions", json=body,
                               headers=headers, timeout=30)
            for _ in range(200):  # bounded: until B has committed it
                if query(pg_url, "SELECT id FROM predictions"):
                    break
                time.sleep(0.02)
            repeat = httpx.post(f"{a.base}/v1/predictions", headers=headers, timeout=30,
                                json=body)
            elapsed = time.monotonic() - started
            first = on_b.result(timeout=30)
        assert first.status_code == 200, first.text
        assert repeat.status_code == 200, repeat.text
        assert repeat.json()["id"] == first.json()["id"]
        assert repeat.json()["status"] == "completed" and repeat.json()["outputs"]
        assert elapsed < SLOW_S + 1.5, elapsed
        assert finished_by(b, first.json()["id"]) and not finished_by(a, first.json()["id"])
    assert vibedream_sim.stats["submits"] == 1


def test_a_sync_client_on_a_gets_its_answer_after_a_takeover(
    tmp_path: Path, vibedream_sim: SimulatorServer, pg_url: str
) -> None:
    """A admits a sync prediction and drives it; its lease is then taken from it (as
    when A stalls past lease_s). A stops driving, the prediction is resumed from its
    rows (its upstream job followed, never submitted again), and A's client still
    gets the completed prediction."""
    config_a, config_b = two_replicas(tmp_path, vibedream_sim, pg_url, lease_s=2.0)
    with serve_process(config_a, tmp_path, workers=1) as a, \
            serve_process(config_b, tmp_path, workers=1) as b, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{a.base}/v1/predictions", timeout=60,
                             json={**BODY, "enable_sync_mode": True})
        pred_id = None
        for _ in range(200):  # bounded: until A has accepted it upstream
            rows = query(pg_url, "SELECT p.id FROM predictions p JOIN attempts t "
                                 "ON t.prediction_id = p.id WHERE t.upstream_id IS NOT NULL")
            if rows:
                pred_id = rows[0][0]
                break
            time.sleep(0.05)
        assert pred_id is not None, "A never accepted the prediction upstream"
        execute(pg_url, "UPDATE predictions SET lease_owner = 'ghost', "
                        f"lease_expires_at = now() - interval '1 second' WHERE id = '{pred_id}'")
        r = answer.result(timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["id"] == pred_id and r.json()["status"] == "completed"
        assert r.json()["outputs"]
        assert any(e.get("prediction_id") == pred_id for e in a.events("lease.lost"))
        [(status, owner)] = query(pg_url, "SELECT status, lease_owner FROM predictions "
                                          f"WHERE id = '{pred_id}'")
        assert (status, owner) == ("completed", None)
        assert finished_by(a, pred_id) or finished_by(b, pred_id)
    assert vibedream_sim.stats["submits"] == 1  # followed, not submitted again
    assert len(vibedream_sim.billing["tasks"]) == 1
