"""Per-key request rate limits: a token bucket of `rate` per second holding `burst`.

Three places can hold the buckets; the app picks one at start (`limiter_for`):

* `LocalRateLimiter`: in this process's memory. No round trip; right for one
  process with no Redis (each replica then has its own buckets).
* `RedisRateLimiter` (`redis_url` set): one Lua script per check, atomic in
  Redis and timed by Redis' clock, so every process and replica shares a key's
  bucket.
* `DatabaseRateLimiter` (several `workers`, no Redis): one atomic upsert per
  check on the shared database (`proxy_meta`, a row per limited key), timed by
  the database's clock. One more write per create request; reads are never
  rate-limited.

The shared ones store the bucket as GCRA's "theoretical arrival time" (one
integer of microseconds; equivalent to a token bucket): a request at `now` is
allowed when `tat - now <= (burst - 1) * interval`, and then `tat =
max(tat, now) + interval`. Whatever the number of processes, a key is
allowed at most `burst + rate * t` requests in any `t` seconds. When the shared
store fails, the check falls back to this process's own bucket (logged), so an
outage of Redis or the database degrades the limit rather than the service.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from common.logging import get_logger
from proxy.store.repo import Store

if TYPE_CHECKING:  # redis is imported only where redis_url is set (RedisRateLimiter)
    from proxy.shared import SharedRedis

log = get_logger("flux_proxy.ratelimit")

WARN_EVERY_S = 30.0


class RateLimiter(Protocol):
    async def take(self, key_id: str, rate: float, burst: float) -> float | None:
        """None when one request of `key_id` is allowed now; else seconds to wait."""
        ...


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    updated: float = field(default_factory=time.monotonic)

    def take(self) -> float | None:
        """None when allowed; else seconds until a token is free."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / self.rate


class LocalRateLimiter:
    """This process's buckets (bounded: one per rate-limited key)."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def take_now(self, key_id: str, rate: float, burst: float) -> float | None:
        bucket = self._buckets.get(key_id)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            bucket = self._buckets[key_id] = TokenBucket(rate, burst, burst)
        return bucket.take()

    async def take(self, key_id: str, rate: float, burst: float) -> float | None:
        return self.take_now(key_id, rate, burst)


def gcra_params(rate: float, burst: float) -> tuple[int, int]:
    """(interval, tolerance) in whole microseconds. The interval rounds up, so the
    integer bucket never admits faster than `rate`."""
    interval = max(1, math.ceil(1_000_000 / rate))
    return interval, max(0, math.floor(burst) - 1) * interval


class _Fallback:
    """The local bucket to use while the shared store fails, and a quiet warning."""

    def __init__(self, where: str) -> None:
        self.local = LocalRateLimiter()
        self._where = where
        self._warned_at = -math.inf

    def take(self, key_id: str, rate: float, burst: float, exc: Exception) -> float | None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("ratelimit.shared_unavailable", store=self._where,
                        error=f"{type(exc).__name__}: {exc}",
                        message="key rate limits are per process until it is back")
        return self.local.take_now(key_id, rate, burst)


# KEYS[1]: the key's bucket; ARGV: interval_us, tolerance_us. Returns -1 when
# allowed, else the microseconds to wait. Redis' own clock, so skew between the
# proxies' hosts does not matter.
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - now > tolerance then
  return tat - tolerance - now
end
local new = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.ceil((new - now) / 1000) + 1000)
return -1
"""


class RedisRateLimiter:
    def __init__(self, shared: SharedRedis) -> None:
        self._shared = shared
        self._script = shared.client.register_script(_GCRA_LUA)
        self._fallback = _Fallback("redis")

    async def take(self, key_id: str, rate: float, burst: float) -> float | None:
        from proxy.shared import RedisError

        interval, tolerance = gcra_params(rate, burst)
        try:
            wait_us = int(await self._script(keys=[self._shared.key("rate", key_id)],
                                             args=[interval, tolerance]))
        except (RedisError, OSError, TimeoutError) as exc:
            return self._fallback.take(key_id, rate, burst, exc)
        return None if wait_us < 0 else wait_us / 1_000_000


# The database's clock in microseconds, so every process and replica reads one time.
_NOW_US = {
    "sqlite": "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)",
    "postgresql": "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000000 AS BIGINT)",
}
_INT = {"sqlite": "INTEGER", "postgresql": "BIGINT"}
_GREATEST = {"sqlite": "MAX", "postgresql": "GREATEST"}


def _take_sql(backend: str) -> str:
    now, num, greatest = _NOW_US[backend], _INT[backend], _GREATEST[backend]
    return (
        f"INSERT INTO proxy_meta (name, value) VALUES (:name, CAST({now} + :interval AS TEXT)) "
        f"ON CONFLICT (name) DO UPDATE SET value = CAST({greatest}("
        f"CAST(proxy_meta.value AS {num}), {now}) + :interval AS TEXT) "
        f"WHERE CAST(proxy_meta.value AS {num}) - {now} <= :tolerance "
        "RETURNING value")


def _ahead_sql(backend: str) -> str:
    return (f"SELECT CAST(value AS {_INT[backend]}) - {_NOW_US[backend]} FROM proxy_meta "
            "WHERE name = :name")


class DatabaseRateLimiter:
    """Buckets in the shared database: row `rate:<key id>` of `proxy_meta`, one
    atomic upsert per check (the row lock serialises concurrent checks)."""

    def __init__(self, store: Store) -> None:
        self._engine = store.engine
        backend = store.backend
        if backend not in _NOW_US:
            raise ValueError(f"no database rate limiter for {backend}")
        self._take = text(_take_sql(backend))
        self._ahead = text(_ahead_sql(backend))
        self._fallback = _Fallback("database")

    async def take(self, key_id: str, rate: float, burst: float) -> float | None:
        interval, tolerance = gcra_params(rate, burst)
        name = f"rate:{key_id}"
        try:
            async with self._engine.begin() as conn:
                taken = (await conn.execute(self._take, {
                    "name": name, "interval": interval, "tolerance": tolerance})).first()
                if taken is not None:
                    return None
                ahead = (await conn.execute(self._ahead, {"name": name})).scalar()
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            return self._fallback.take(key_id, rate, burst, exc)
        return max(0, int(ahead or 0) - tolerance) / 1_000_000 or 1e-6


def limiter_for(*, shared: SharedRedis | None, store: Store, workers: int) -> RateLimiter:
    """Redis when configured; the database when several processes share it; else memory."""
    if shared is not None:
        return RedisRateLimiter(shared)
    if workers > 1:
        return DatabaseRateLimiter(store)
    return LocalRateLimiter()
