"""Provider health shared between processes and replicas through Redis.

What keeps a provider out of traffic is shared; the rest of its health stays per
process:

* a breaker that opens in one process is open in all of them within about
  `SYNC_INTERVAL_S` (the key ``<prefix>open:<provider>``, living as long as the
  cooldown left). After the cooldown every process probes on its own; a failed
  probe opens it again for all.
* a 429's cooldown (Retry-After) likewise (``<prefix>rate_limited:<provider>``).

Redis keeps the time left (PTTL), not a wall-clock time, so skew between hosts
does not matter. This process's own opens and cooldowns are written at once,
others' read every `SYNC_INTERVAL_S`. While Redis is unreachable each process
goes on with what it sees itself (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Mapping

from common.logging import get_logger
from proxy.routing.health import ProviderHealth
from proxy.shared import RedisError, SharedRedis

log = get_logger("flux_proxy.sharing")

SYNC_INTERVAL_S = 0.5
WARN_EVERY_S = 30.0
WHATS = ("open", "rate_limited")

# KEYS[1]; ARGV: value, milliseconds. Set, unless the key already lasts longer.
_EXTEND_LUA = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class HealthSync:
    def __init__(self, health: Mapping[str, ProviderHealth], shared: SharedRedis,
                 instance_id: str, *, interval_s: float = SYNC_INTERVAL_S) -> None:
        self._health = health
        self._shared = shared
        self._instance = instance_id
        self._interval = interval_s
        self._extend = shared.client.register_script(_EXTEND_LUA)
        self._pending: dict[tuple[str, str], float] = {}  # (provider, what) -> seconds
        self._wake = asyncio.Event()
        self._seq = itertools.count(1)
        self._applied: dict[str, str] = {}  # provider -> the open (token) already applied
        self._task: asyncio.Task[None] | None = None
        self._warned_at = -math.inf

    async def start(self) -> None:
        for h in self._health.values():
            h.share = self._note
        await self.sync_once(quiet=True)  # a process started while a provider is open
        self._task = asyncio.create_task(self._run(), name="health-sync")

    async def stop(self) -> None:
        for h in self._health.values():
            h.share = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self.sync_once(quiet=True)  # what happened last still reaches the others

    def _note(self, provider: str, what: str, seconds: float) -> None:
        key = (provider, what)
        self._pending[key] = max(self._pending.get(key, 0.0), seconds)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self.sync_once()

    async def sync_once(self, *, quiet: bool = False) -> None:
        """Write this process's new opens and cooldowns; read everyone's."""
        pending, self._pending = self._pending, {}
        pipe = self._shared.client.pipeline(transaction=False)
        for (provider, what), seconds in pending.items():
            token = f"{self._instance}:{next(self._seq)}"
            if what == "open":
                self._applied[provider] = token
            await self._extend(keys=[self._shared.key(what, provider)],
                               args=[token, max(1, math.ceil(seconds * 1000))], client=pipe)
        names = list(self._health)
        for name in names:
            pipe.get(self._shared.key("open", name))
            pipe.pttl(self._shared.key("open", name))
            pipe.pttl(self._shared.key("rate_limited", name))
        try:
            results = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            for key, seconds in pending.items():  # try again next time
                self._pending[key] = max(self._pending.get(key, 0.0), seconds)
            self._warn(exc, quiet)
            return
        results = results[len(pending):]
        for i, name in enumerate(names):
            token, open_ms, limited_ms = results[3 * i: 3 * i + 3]
            health = self._health[name]
            if token and open_ms > 0 and self._applied.get(name) != token:
                self._applied[name] = token
                health.apply_shared(open_for=open_ms / 1000)
                log.info("breaker.shared_open", provider=name, by=token.rsplit(":", 1)[0],
                         open_for_s=round(open_ms / 1000, 3))
            if limited_ms > 0:
                health.apply_shared(limited_for=limited_ms / 1000)

    def _warn(self, exc: Exception, quiet: bool) -> None:
        now = time.monotonic()
        if quiet or now - self._warned_at < WARN_EVERY_S:
            return
        self._warned_at = now
        log.warning("health.shared_unavailable", error=f"{type(exc).__name__}: {exc}",
                    message="breakers and 429 cooldowns are per process until Redis is back")
