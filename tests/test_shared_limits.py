"""State several processes share: key rate limits (Redis, or the database without
it), breaker opens and provider 429 cooldowns (Redis).

The unit tests stand two "processes" up as two clients of the same Redis or two
engines on the same database; the last test runs `serve --workers 2` for real.
Redis is the one at 127.0.0.1:6379 (TEST_REDIS_URL), each test under a key
prefix of its own, deleted after.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from providers.base import ErrorKind
from providers.simulators import SimulatorServer
from proxy.accounts.ratelimit import (
    DatabaseRateLimiter,
    LocalRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    limiter_for,
)
from proxy.routing.breaker import BreakerSettings, BreakerState
from proxy.routing.health import ProviderHealth
from proxy.routing.sharing import HealthSync
from proxy.shared import DEFAULT_PREFIX, SharedRedis, open_shared, parse_redis_url
from proxy.store import Store

from ._serve import (
    ADMIN,
    PG_URL,
    REDIS_URL,
    pg_database,
    query,
    redis_prefix,
    serve_process,
    sqlite_url,
    write_config,
)

RATE, BURST = 20.0, 10.0


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix() as p:
        yield p


@pytest.fixture
async def two_redis(prefix: str) -> AsyncIterator[tuple[SharedRedis, SharedRedis]]:
    a = open_shared(f"{REDIS_URL}?key_prefix={prefix}")
    b = open_shared(f"{REDIS_URL}?key_prefix={prefix}")
    assert await a.ping(), f"no Redis at {REDIS_URL}"
    yield a, b
    await a.aclose()
    await b.aclose()


async def hammer(limiters: list[RateLimiter], key_id: str, duration_s: float,
                 rate: float = RATE, burst: float = BURST) -> tuple[int, float, list[float]]:
    """Four callers per limiter take as fast as they can for `duration_s`:
    (allowed, the seconds from the first call to the last answer, the waits)."""
    allowed = 0
    waits: list[float] = []
    start = time.monotonic()
    stop_at = start + duration_s

    async def caller(limiter: RateLimiter) -> None:
        nonlocal allowed
        while time.monotonic() < stop_at:
            wait = await limiter.take(key_id, rate, burst)
            if wait is None:
                allowed += 1
            else:
                waits.append(wait)
                await asyncio.sleep(0.002)

    await asyncio.gather(*(caller(lim) for lim in limiters for _ in range(4)))
    return allowed, time.monotonic() - start, waits


def assert_bounded(allowed: int, elapsed: float, waits: list[float],
                   rate: float = RATE, burst: float = BURST) -> None:
    assert allowed <= burst + rate * elapsed, (allowed, elapsed)
    # ... and not stingy: close to the whole allowance was used.
    assert allowed >= burst + rate * elapsed * 0.6 - 2, (allowed, elapsed)
    assert waits and all(0 < w <= 1 / rate + 0.01 for w in waits), waits[:5]


# --------------------------------------------------------------------------- rate limits


async def test_redis_buckets_hold_across_processes(
    two_redis: tuple[SharedRedis, SharedRedis],
) -> None:
    a, b = two_redis
    allowed, elapsed, waits = await hammer([RedisRateLimiter(a), RedisRateLimiter(b)],
                                           "key_shared", 1.0)
    assert_bounded(allowed, elapsed, waits)
    # The bucket is one key under the prefix, with an expiry.
    ttl = await a.client.pttl(a.key("rate", "key_shared"))
    assert 0 < ttl <= 2000 + 1000


async def test_redis_buckets_are_per_key(two_redis: tuple[SharedRedis, SharedRedis]) -> None:
    a, _ = two_redis
    limiter = RedisRateLimiter(a)
    for _ in range(3):
        assert await limiter.take("key_one", 1.0, 3.0) is None
    assert await limiter.take("key_one", 1.0, 3.0) is not None
    assert await limiter.take("key_two", 1.0, 3.0) is None


async def test_an_unreachable_redis_falls_back_to_this_process(prefix: str) -> None:
    shared = open_shared(f"redis://127.0.0.1:1/0?key_prefix={prefix}")
    try:
        assert not await shared.ping()
        limiter = RedisRateLimiter(shared)
        results = [await limiter.take("key_x", 1.0, 2.0) for _ in range(3)]
        assert results[:2] == [None, None] and results[2] is not None
    finally:
        await shared.aclose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def two_stores(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> AsyncIterator[tuple[Store, Store]]:
    if request.param == "sqlite":
        url, schema = sqlite_url(tmp_path), None
    else:
        if os.environ.get("FLUX_PROXY_SKIP_PG") == "1":
            pytest.skip("FLUX_PROXY_SKIP_PG=1: no PostgreSQL on this machine")
        url, schema = PG_URL, f"flux_limits_{uuid.uuid4().hex[:10]}"
    a, b = Store(url, schema=schema), Store(url, schema=schema)
    await a.upgrade()
    try:
        yield a, b
    finally:
        if schema:
            async with a.engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await a.dispose()
        await b.dispose()


async def test_database_buckets_hold_across_processes(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    allowed, elapsed, waits = await hammer([DatabaseRateLimiter(a), DatabaseRateLimiter(b)],
                                           "key_shared", 1.0)
    assert_bounded(allowed, elapsed, waits)
    # One row per key, next to the key-hash secret.
    assert await a.meta_value("rate:key_shared", "missing") != "missing"


async def test_an_unreachable_database_falls_back_to_this_process() -> None:
    store = Store("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    try:
        limiter = DatabaseRateLimiter(store)
        results = [await limiter.take("key_x", 1.0, 2.0) for _ in range(3)]
        assert results[:2] == [None, None] and results[2] is not None
    finally:
        await store.dispose()


async def test_the_limiter_is_redis_then_the_database_then_memory(tmp_path: Path) -> None:
    store = Store(sqlite_url(tmp_path))
    shared = open_shared(REDIS_URL)
    assert isinstance(limiter_for(shared=shared, store=store, workers=1), RedisRateLimiter)
    assert isinstance(limiter_for(shared=None, store=store, workers=2), DatabaseRateLimiter)
    assert isinstance(limiter_for(shared=None, store=store, workers=1), LocalRateLimiter)
    await shared.aclose()
    await store.dispose()


def test_the_redis_url_names_the_key_prefix() -> None:
    assert parse_redis_url("redis://h:6379/2?key_prefix=stage:&ssl_cert_reqs=none") == (
        "redis://h:6379/2?ssl_cert_reqs=none", "stage:")
    assert parse_redis_url("redis://h") == ("redis://h", DEFAULT_PREFIX)
    with pytest.raises(ValueError, match="redis://"):
        parse_redis_url("http://h:6379")
    assert "hunter2" not in open_shared("redis://:hunter2@h:6379/0").safe_url


# --------------------------------------------------------------------------- breakers, 429s


def _health(cooldown_s: float) -> dict[str, ProviderHealth]:
    return {"wavespeed": ProviderHealth(
        "wavespeed", BreakerSettings(failure_threshold=1, cooldown_s=cooldown_s))}


async def _until(cond: object, timeout_s: float = 3.0) -> float:
    start = time.monotonic()
    while not cond():  # type: ignore[operator]
        assert time.monotonic() - start < timeout_s, "never happened"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_a_breaker_opened_in_one_process_is_open_in_the_others(
    two_redis: tuple[SharedRedis, SharedRedis],
) -> None:
    ra, rb = two_redis
    a, b = _health(cooldown_s=1.0), _health(cooldown_s=1.0)
    sync_a = HealthSync(a, ra, "proc-a", interval_s=0.1)
    sync_b = HealthSync(b, rb, "proc-b", interval_s=0.1)
    await sync_a.start()
    await sync_b.start()
    try:
        a["wavespeed"].record(ErrorKind.UNAVAILABLE, ok=False, ticket=a["wavespeed"].acquire())
        assert a["wavespeed"].breaker.state is BreakerState.OPEN
        took = await _until(lambda: b["wavespeed"].breaker.state is BreakerState.OPEN)
        assert took < 0.5
        assert b["wavespeed"].acquire() is None and 0.4 < b["wavespeed"].available_in() <= 1.0
        # After the cooldown each probes on its own; a success closes it for good
        # (the open it already applied is not applied again).
        await _until(lambda: b["wavespeed"].breaker.state is BreakerState.HALF_OPEN)
        b["wavespeed"].record(None, ok=True, ticket=b["wavespeed"].acquire())
        await asyncio.sleep(0.3)
        assert b["wavespeed"].breaker.state is BreakerState.CLOSED
        # A failed probe in B opens it again, for A too.
        await _until(lambda: a["wavespeed"].breaker.state is BreakerState.HALF_OPEN)
        b["wavespeed"].record(ErrorKind.TIMEOUT, ok=False, ticket=b["wavespeed"].acquire())
        await _until(lambda: a["wavespeed"].breaker.state is BreakerState.OPEN, 0.5)
    finally:
        await sync_a.stop()
        await sync_b.stop()


async def test_a_429_cooldown_reaches_every_process(
    two_redis: tuple[SharedRedis, SharedRedis],
) -> None:
    ra, rb = two_redis
    a, b = _health(cooldown_s=30), _health(cooldown_s=30)
    sync_a = HealthSync(a, ra, "proc-a", interval_s=0.1)
    sync_b = HealthSync(b, rb, "proc-b", interval_s=0.1)
    await sync_a.start()
    await sync_b.start()
    try:
        a["wavespeed"].record(ErrorKind.RATE_LIMITED, ok=False, retry_after_s=3.0,
                              ticket=a["wavespeed"].acquire())
        await _until(lambda: b["wavespeed"].rate_limited_for() > 0, 0.5)
        assert 2.0 < b["wavespeed"].rate_limited_for() <= 3.0
        assert b["wavespeed"].acquire() is None
        assert b["wavespeed"].breaker.state is BreakerState.CLOSED  # a 429 is no failure
    finally:
        await sync_a.stop()
        await sync_b.stop()


async def test_a_process_started_later_sees_what_is_open(
    two_redis: tuple[SharedRedis, SharedRedis],
) -> None:
    ra, rb = two_redis
    a = _health(cooldown_s=5)
    sync_a = HealthSync(a, ra, "proc-a", interval_s=0.1)
    await sync_a.start()
    a["wavespeed"].record(ErrorKind.UNAVAILABLE, ok=False, ticket=a["wavespeed"].acquire())
    await sync_a.stop()  # flushes
    b = _health(cooldown_s=5)
    sync_b = HealthSync(b, rb, "proc-b", interval_s=0.1)
    await sync_b.start()  # reads before serving
    try:
        assert b["wavespeed"].breaker.state is BreakerState.OPEN
    finally:
        await sync_b.stop()


# --------------------------------------------------------------------------- real processes


@contextmanager
def _database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield sqlite_url(tmp_path)
        return
    with pg_database() as url:
        yield url


@pytest.mark.parametrize(("shared", "db"), [
    ("redis", "sqlite"),
    pytest.param("database", "postgresql", marks=pytest.mark.postgres),
])
def test_a_key_rate_holds_across_worker_processes(
    tmp_path: Path, vibedream_sim: SimulatorServer, shared: str, db: str
) -> None:
    rate, burst = 5.0, 5  # --rate 5/s; the burst defaults to the rate
    vibedream_sim.config.job_latency_s = 60.0  # admitted ones stay in flight: lease owners
    with _database(db, tmp_path) as url, redis_prefix() as prefix:
        config = tmp_path / "proxy.toml"
        write_config(config, vibedream_sim, url, auth=True)
        env = {"FLUX_PROXY_ADMIN_KEY": ADMIN}
        if shared == "redis":
            env["FLUX_PROXY_REDIS_URL"] = f"{REDIS_URL}?key_prefix={prefix}"
        with serve_process(config, tmp_path, workers=2, extra_env=env) as served:
            made = httpx.post(f"{served.base}/admin/keys", json={"name": "bursty", "rate": "5/s"},
                              headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
            assert made.status_code == 201, made.text
            headers = {"Authorization": f"Bearer {made.json()['key']}"}
            statuses: list[int] = []
            stop_at = time.monotonic() + 1.5

            def client() -> None:
                while time.monotonic() < stop_at:  # a new connection each time
                    r = httpx.post(f"{served.base}/v1/predictions", headers=headers,
                                   json={"prompt": "x", "size": "512*512"}, timeout=30)
                    statuses.append(r.status_code)
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1

            start = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                for f in [pool.submit(client) for _ in range(8)]:
                    f.result()
            elapsed = time.monotonic() - start
            admitted = statuses.count(202)
            assert set(statuses) == {202, 429}, statuses
            assert burst <= admitted <= burst + rate * elapsed, (admitted, elapsed)
            # Both workers admitted some: the limit held across them, not within one.
            held = {owner for (owner,) in query(
                url, "SELECT lease_owner FROM predictions WHERE lease_owner IS NOT NULL")}
            assert held == {f"{served.instance_id}/0", f"{served.instance_id}/1"}, held
            if shared == "redis":
                import redis

                keys = redis.Redis.from_url(REDIS_URL).keys(prefix + "rate:*")
                assert len(keys) == 1
