"""Idempotency-Key on every submit route: a repeat of the same request is the same
prediction (one upstream submit), a different request under the key is refused, and
concurrent repeats (in one process, and across two server processes sharing a
database) make one prediction."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from providers.simulators import SimulatorServer
from proxy.store import Prediction, Store, utcnow
from proxy.store.budget import Hold
from proxy.store.idempotency import Claim, IdempotencyHit
from proxy.store.memory import MemoryStore

from ._serve import PG_URL, pg_database, query, serve_process, serving, sqlite_url, write_config
from .conftest import make_settings, running_proxy, wait_terminal

ADMIN = "idem-admin-key"
BODY = {"prompt": "a lighthouse", "size": "512*512"}
# The simulator takes this long per job: a repeat comes while the first is running.
SLOW = {"prompt": "a lighthouse [sim:latency=0.4]", "size": "512*512"}


def key(value: str, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": value, **headers}


@pytest.fixture
def settings(tmp_path: Path, wavespeed_sim: SimulatorServer) -> Any:
    return make_settings(tmp_path, {"wavespeed": wavespeed_sim})


# --------------------------------------------------------------------------- one process


async def test_repeat_is_the_same_prediction_with_its_current_state(
    settings: Any, wavespeed_sim: SimulatorServer
) -> None:
    async with running_proxy(settings) as c:
        first = await c.post("/v1/predictions", json=SLOW, headers=key("order-1"))
        assert first.status_code == 202, first.text
        pred_id = first.json()["id"]
        again = await c.post("/v1/predictions", json=SLOW, headers=key("order-1"))
        assert again.status_code == 200, again.text
        assert again.json()["id"] == pred_id
        assert again.json()["status"] in ("queued", "processing")
        await wait_terminal(c, pred_id)
        late = await c.post("/v1/predictions", json=SLOW, headers=key("order-1"))
        assert late.status_code == 200
        assert late.json()["id"] == pred_id and late.json()["status"] == "completed"
        assert late.headers["x-flux-prediction-id"] == pred_id
        # Without the header (or with another key) it is a new prediction.
        other = await c.post("/v1/predictions", json=SLOW, headers=key("order-2"))
        assert other.status_code == 202 and other.json()["id"] != pred_id
        await wait_terminal(c, other.json()["id"])
    assert wavespeed_sim.stats["submits"] == 2


async def test_a_repeat_does_not_count_against_the_rate_limit(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    """A client retrying after a lost answer gets its prediction, not a 429."""
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, auth_enabled=True,
                             admin_key=ADMIN)
    async with running_proxy(settings) as c:
        made = await c.post("/admin/keys", json={"name": "slow-lane", "rate": "1/m",
                                                 "burst": 1},
                            headers={"Authorization": f"Bearer {ADMIN}"})
        auth = {"Authorization": f"Bearer {made.json()['key']}"}
        first = await c.post("/v1/predictions", json=BODY, headers=key("retry-1", **auth))
        assert first.status_code == 202, first.text
        for _ in range(3):
            again = await c.post("/v1/predictions", json=BODY, headers=key("retry-1", **auth))
            assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        # A new request is still limited.
        new = await c.post("/v1/predictions", json=BODY, headers=key("retry-2", **auth))
        assert new.status_code == 429
        await wait_terminal(c, first.json()["id"], headers=auth)
    assert wavespeed_sim.stats["submits"] == 1


async def test_concurrent_sync_repeats_wait_for_the_one_prediction(
    settings: Any, wavespeed_sim: SimulatorServer
) -> None:
    """Real concurrency (a uvicorn server, one connection each): every repeat waits
    for the one prediction and answers its result."""
    body = {**SLOW, "enable_sync_mode": True}
    with serving(settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=20) as c:
            answers = await asyncio.gather(*(
                c.post("/v1/predictions", json=body, headers=key("sync-1")) for _ in range(6)))
            late = await c.post("/v1/predictions", json=body, headers=key("sync-1"))
    assert all(r.status_code == 200 for r in [*answers, late]), [r.text for r in answers]
    assert len({r.json()["id"] for r in [*answers, late]}) == 1
    assert all(r.json()["status"] == "completed" and r.json()["outputs"] for r in answers)
    assert wavespeed_sim.stats["submits"] == 1


async def test_same_key_with_a_different_body_is_422_and_sends_nothing(
    settings: Any, wavespeed_sim: SimulatorServer
) -> None:
    async with running_proxy(settings) as c:
        first = await c.post("/v1/predictions", json=BODY, headers=key("k"))
        assert first.status_code == 202
        changed = await c.post("/v1/predictions", json={**BODY, "seed": 7}, headers=key("k"))
        assert changed.status_code == 422, changed.text
        error = changed.json()["error"]
        assert error["code"] == "idempotency_key_reused"
        assert error["details"][0]["field"] == "Idempotency-Key"
        assert "different request" in error["message"]
        bad = await c.post("/v1/predictions", json=BODY, headers=key("x" * 256))
        assert bad.status_code == 422
        assert bad.json()["error"]["details"][0]["field"] == "Idempotency-Key"
        await wait_terminal(c, first.json()["id"])
        listed = (await c.get("/v1/predictions")).json()["data"]
    assert len(listed) == 1 and wavespeed_sim.stats["submits"] == 1


async def test_client_keys_have_their_own_scopes(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, auth_enabled=True,
                             admin_key=ADMIN)
    async with running_proxy(settings) as c:
        keys = []
        for name in ("app-a", "app-b"):
            made = await c.post("/admin/keys", json={"name": name},
                                headers={"Authorization": f"Bearer {ADMIN}"})
            keys.append({"Authorization": f"Bearer {made.json()['key']}"})
        a, b = [await c.post("/v1/predictions", json=BODY, headers=key("same", **k))
                for k in keys]
        assert a.status_code == b.status_code == 202
        assert a.json()["id"] != b.json()["id"]
        again = await c.post("/v1/predictions", json=BODY, headers=key("same", **keys[1]))
        assert again.status_code == 200 and again.json()["id"] == b.json()["id"]
        for r, k in ((a, keys[0]), (b, keys[1])):
            await wait_terminal(c, r.json()["id"], headers=k)
    assert wavespeed_sim.stats["submits"] == 2


SURFACES = {
    "openai": ("/v1/images/generations",
               {"model": "flux-dev", "prompt": "a lighthouse", "size": "512x512"}),
    "wavespeed": ("/api/v3/wavespeed-ai/flux-dev", BODY),
    "vibedream": ("/api/v1/models/flux-dev/generate", BODY),
}


@pytest.mark.parametrize("surface", list(SURFACES))
async def test_every_surface_honours_the_key(
    surface: str, settings: Any, wavespeed_sim: SimulatorServer
) -> None:
    path, body = SURFACES[surface]
    with serving(settings) as base:
        async with httpx.AsyncClient(base_url=base, timeout=20) as c:
            answers = await asyncio.gather(*(
                c.post(path, json=body, headers=key(f"{surface}-1")) for _ in range(3)))
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
            ids = {r.headers["x-flux-prediction-id"] for r in answers}
            assert len(ids) == 1
            changed = await c.post(path, json={**body, "prompt": "a boat"},
                                   headers=key(f"{surface}-1"))
            assert changed.status_code in (400, 422), changed.text
            assert "Idempotency-Key" in changed.text
            # The same key on another surface is another request: refused too.
            native = await c.post("/v1/predictions", json=BODY, headers=key(f"{surface}-1"))
            assert native.status_code == 422
            pred_id = ids.pop()
            for _ in range(100):
                got = (await c.get(f"/v1/predictions/{pred_id}")).json()
                if got["status"] == "completed":
                    break
                await asyncio.sleep(0.05)
            assert got["status"] == "completed"
    assert wavespeed_sim.stats["submits"] == 1


async def test_an_expired_key_makes_a_new_prediction(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, idempotency_ttl_s=0.3)
    async with running_proxy(settings) as c:
        first = await c.post("/v1/predictions", json=BODY, headers=key("short"))
        await wait_terminal(c, first.json()["id"])
        await asyncio.sleep(0.35)
        second = await c.post("/v1/predictions", json={**BODY, "seed": 3},
                              headers=key("short"))
        assert second.status_code == 202, second.text
        assert second.json()["id"] != first.json()["id"]
        await wait_terminal(c, second.json()["id"])
    assert wavespeed_sim.stats["submits"] == 2


# --------------------------------------------------------------------------- the stores


@asynccontextmanager
async def open_store(kind: str, tmp_path: Path) -> AsyncIterator[Any]:
    if kind == "memory":
        yield MemoryStore()
        return
    if kind == "postgresql" and os.environ.get("FLUX_PROXY_SKIP_PG") == "1":
        pytest.skip("FLUX_PROXY_SKIP_PG=1: no PostgreSQL on this machine")
    schema = f"flux_idem_{uuid.uuid4().hex[:12]}" if kind == "postgresql" else None
    store = Store(PG_URL if schema else sqlite_url(tmp_path), schema=schema)
    await store.upgrade()
    try:
        yield store
    finally:
        if schema:
            async with store.engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await store.dispose()


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        with pg_database() as url:
            yield url


def claim(key: str = "k", request_hash: str = "h1", ttl_s: float = 60) -> Claim:
    return Claim("key-1", key, request_hash, utcnow() + timedelta(seconds=ttl_s))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "memory"])
async def test_store_claims_atomically(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        first = Prediction(model="flux-dev", request={}, seed=1, api_key_id="key-1")
        await store.create_prediction(first, claim=claim())
        hit = await store.find_idempotency("key-1", "k")
        assert hit is not None and hit.prediction_id == first.id and hit.request_hash == "h1"
        assert await store.find_idempotency("key-2", "k") is None
        # Concurrent claims of one key (one batch, or each alone with a budget hold):
        # exactly one prediction is written; the others hear whose it is and hold nothing.
        racers = [Prediction(model="flux-dev", request={}, seed=1, api_key_id="key-1")
                  for _ in range(4)]
        hold = Hold("key-1", 10**9, utcnow() - timedelta(days=1), 5)
        results = await asyncio.gather(
            *(store.create_prediction(p, hold if i % 2 else None, claim("race", "h2"))
              for i, p in enumerate(racers)), return_exceptions=True)
        won = [p for p, r in zip(racers, results, strict=True) if isinstance(r, Prediction)]
        assert len(won) == 1
        assert all(isinstance(r, IdempotencyHit) and r.hit.prediction_id == won[0].id
                   for r in results if not isinstance(r, Prediction))
        for p in racers:
            assert (await store.get_prediction(p.id) is not None) == (p is won[0])
        assert await store.exposure("key-1", utcnow() - timedelta(days=1)) == (
            0, 5 if racers.index(won[0]) % 2 else 0)
        # An expired key is free again; the sweep deletes expired rows.
        await store.create_prediction(
            Prediction(model="flux-dev", request={}, seed=1), claim=claim("old", ttl_s=-1))
        assert await store.find_idempotency("key-1", "old") is None
        again = Prediction(model="flux-dev", request={}, seed=1)
        await store.create_prediction(again, claim=claim("old", "h3"))
        hit = await store.find_idempotency("key-1", "old")
        assert hit is not None and hit.prediction_id == again.id
        assert await store.sweep_idempotency(utcnow() + timedelta(seconds=120)) == 3


# --------------------------------------------------------------------------- two processes


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_concurrent_repeats_on_two_processes_are_one_prediction(
    db: str, tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    with database(db, tmp_path) as url:
        config = tmp_path / "proxy.toml"
        write_config(config, vibedream_sim, url)
        with serve_process(config, tmp_path, workers=2) as served:
            body = {**SLOW, "enable_sync_mode": True}

            def one(_: int) -> httpx.Response:
                # A new connection each: the kernel spreads them over both workers.
                return httpx.post(f"{served.base}/v1/predictions", json=body,
                                  headers=key("two-procs"), timeout=30)

            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(one, range(16)))
            assert time.monotonic() - started < 30
            # Both processes answered: the one that made it, and the other by replaying.
            [made] = served.events("prediction.queued")
            replayed = {e["worker"] for e in served.events("prediction.replayed")}
            assert replayed - {made["worker"]}, "every request reached one worker"
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        assert len({r.json()["id"] for r in answers}) == 1
        assert all(r.json()["status"] == "completed" for r in answers)
        assert query(url, "SELECT count(*) FROM predictions") == [(1,)]
        assert query(url, "SELECT count(*) FROM attempts") == [(1,)]
    assert vibedream_sim.stats["submits"] == 1
