"""The traffic of ``ledger_audit.py``: random predictions, the client that sends them, and
the fault knobs toggled on the simulators meanwhile.

Each prediction has a unique prompt (``ledger audit <tag> #<i>``), so the simulators'
billing logs (which record every task's prompt) can be tied back to it even when the
proxy never learned the task's id. Prompts may carry a per-request simulator directive
(moderation, failure after accept, drop after accept, failed polls, a cancelled task);
the server-wide knobs are toggled at random on both simulators while traffic flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.harness.procs import loopback

# VibeDream takes these seven; WaveSpeed any side in 256..1536.
VD_SIZES = ("512*512", "768*768", "1024*1024", "1024*768", "768*1024", "1280*720", "720*1280")
# Server-wide faults (SimConfig fields), one at a time per simulator, on top of FAULTS_OFF.
FAULTS: dict[str, dict[str, Any]] = {
    "5xx": {"error_rate": 0.6},
    "429": {"rate_limit": 0.6},
    "hang": {"hang": True},
    "drop": {"drop": True},
    "drop-after-accept": {"drop_after_accept": True},
    "fail-after-accept": {"fail_after_accept": True},
    "moderation": {"moderate": True},
    "malformed": {"malformed": True},
    "poll-5xx": {"poll_error_rate": 0.5},
}
FAULTS_OFF: dict[str, Any] = {
    "error_rate": 0.0, "rate_limit": 0.0, "hang": False, "drop": False,
    "drop_after_accept": False, "fail_after_accept": False, "moderate": False,
    "malformed": False, "poll_error_rate": 0.0,
}
# Per-request directives (they follow the request to every provider it is tried on).
DIRECTIVES = ("[sim:moderate]", "[sim:fail-after-accept]", "[sim:drop-after-accept]",
              "[sim:poll-500=2]", "[sim:status=cancelled]")
CONNECT_RETRY_S = 0.25
MAX_CONNECT_RETRIES = 240  # 60 s of a proxy that is down (the restart takes a few)


@dataclass
class Sent:
    """One prediction as the client saw it."""

    index: int
    body: dict[str, Any]
    outcome: str = "not sent"  # "HTTP 200" / "HTTP 202" / "HTTP <n>" / "lost (<exc>)"
    prediction_id: str | None = None
    status: str | None = None
    connect_retries: int = 0

    @property
    def prompt(self) -> str:
        return str(self.body["prompt"])


def make_bodies(n: int, tag: str, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` random prediction bodies with unique prompts."""
    bodies = []
    for i in range(n):
        if rng.random() < 0.7:
            size = rng.choice(VD_SIZES)  # both providers take it: failover is possible
        else:
            size = f"{rng.randrange(256, 1537, 64)}*{rng.randrange(256, 1537, 64)}"
        latency = 2.5 if rng.random() < 0.05 else round(rng.uniform(0.05, 0.6), 2)
        directive = rng.choice(DIRECTIVES) if rng.random() < 0.12 else ""
        prompt = f"ledger audit {tag} #{i}: a lighthouse at dusk [sim:latency={latency}]"
        body: dict[str, Any] = {
            "prompt": f"{prompt} {directive}".rstrip(), "size": size,
            "num_images": rng.randint(1, 4), "seed": rng.randrange(0, 2**31 - 1),
            "enable_sync_mode": rng.random() < 0.5,
        }
        if rng.random() < 0.1:
            body["enable_base64_output"] = True
        bodies.append(body)
    return bodies


async def send(client: httpx.AsyncClient, rec: Sent, stop_at: float) -> None:
    """POST one prediction. A connection refused (the proxy is down: nothing was sent)
    is retried; any other transport error means the answer was lost and the prediction
    may exist: it is never sent again (the audit finds it in the database)."""
    for _ in range(MAX_CONNECT_RETRIES):
        try:
            r = await client.post("/v1/predictions", json=rec.body)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            rec.connect_retries += 1
            if time.monotonic() > stop_at:
                rec.outcome = "not sent (proxy down)"
                return
            await asyncio.sleep(CONNECT_RETRY_S)
            continue
        except httpx.HTTPError as exc:
            rec.outcome = f"lost ({type(exc).__name__})"
            return
        rec.outcome = f"HTTP {r.status_code}"
        with contextlib.suppress(ValueError):
            data = r.json()
            if isinstance(data, dict) and r.status_code in (200, 202):
                rec.prediction_id, rec.status = data.get("id"), data.get("status")
        return
    rec.outcome = "not sent (proxy down)"


@dataclass
class Chaos:
    """Toggles one random fault (or none) on each simulator every 0.4-1.2 s."""

    urls: dict[str, str]  # simulator name -> base URL
    rng: random.Random
    toggles: Counter[str] = field(default_factory=Counter)
    errors: int = 0

    async def set(self, client: httpx.AsyncClient, name: str, fault: str | None) -> None:
        knobs = FAULTS_OFF | (FAULTS[fault] if fault else {})
        try:
            r = await client.post(loopback(self.urls[name]) + "/_sim/config", json=knobs)
            r.raise_for_status()
        except httpx.HTTPError:
            self.errors += 1
            return
        if fault:
            self.toggles[f"{name} {fault}"] += 1

    async def run(self, stop: asyncio.Event, time_limit_s: float) -> None:
        faults = sorted(FAULTS)
        deadline = time.monotonic() + time_limit_s
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    for name in self.urls:
                        fault = None if self.rng.random() < 0.45 else self.rng.choice(faults)
                        await self.set(client, name, fault)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.rng.uniform(0.4, 1.2))
            finally:
                for name in self.urls:  # every fault off: the rest can finish
                    await self.set(client, name, None)


async def drive(base_url: str, headers: dict[str, str], bodies: list[dict[str, Any]], *,
                concurrency: int, request_timeout_s: float, time_limit_s: float,
                chaos: Chaos, kill_at: int, kill: Callable[[], Awaitable[None]]) -> list[Sent]:
    """Send every body from ``concurrency`` closed-loop workers while ``chaos`` toggles
    faults; once ``kill_at`` have been issued, ``kill()`` runs (alongside the workers,
    which retry refused connections meanwhile). No request starts after
    ``time_limit_s``; every fault is off again on return."""
    records = [Sent(i, b) for i, b in enumerate(bodies)]
    stop_at = time.monotonic() + time_limit_s
    issued = 0
    reached = asyncio.Event()
    # No keep-alive: after the SIGKILL a new request finds the port closed (connection
    # refused: safe to retry) instead of a dead pooled connection.
    client = httpx.AsyncClient(
        base_url=loopback(base_url), headers=headers, trust_env=False,
        timeout=httpx.Timeout(request_timeout_s, connect=2.0),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=0))

    async def worker() -> None:
        nonlocal issued
        while issued < len(records) and time.monotonic() < stop_at:
            rec = records[issued]
            issued += 1
            if issued >= kill_at:
                reached.set()
            await send(client, rec, stop_at + 60)

    stop = asyncio.Event()
    chaos_task = asyncio.create_task(chaos.run(stop, time_limit_s + 120))
    workers = asyncio.gather(*(worker() for _ in range(concurrency)))
    try:
        # The kill, once kill_at requests are out (never, if the workers finish first).
        waiter: asyncio.Future[Any] = asyncio.ensure_future(reached.wait())
        either: list[asyncio.Future[Any]] = [waiter, workers]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if reached.is_set():
            await asyncio.sleep(chaos.rng.uniform(0.0, 0.3))
            await kill()
        await workers
    finally:
        workers.cancel()
        stop.set()
        await chaos_task
        await client.aclose()
    return records


def client_counts(records: list[Sent]) -> dict[str, int]:
    counts: Counter[str] = Counter(r.outcome for r in records)
    counts["connect retries (proxy down)"] = sum(r.connect_retries for r in records)
    counts["sync requests"] = sum(bool(r.body.get("enable_sync_mode")) for r in records)
    return dict(counts)
