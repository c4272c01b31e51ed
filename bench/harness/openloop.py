"""Open-loop load: arrivals on a fixed schedule, sparse result checks, a /healthz prober.

* :class:`ClientPool`: httpx clients of one connection each, lent out first in, first
  out (one shared client with a big pool costs far more CPU per request: ``load.py``).
* :func:`arrivals`: calls ``fire`` every ``1/rate`` seconds whatever the answers do
  (open loop); a late arrival is a sign the load generator is the bottleneck.
* :class:`PredictionLoad`: async predictions on that schedule (``POST /v1/predictions``
  on a :class:`ClientPool`, shed past a backlog), followed by a :class:`Checker`.
* :class:`Checker`: each prediction checked once after it should have ended, then every
  ``every_s`` until terminal (at most ``max_checks`` GETs each), so the client adds
  about one GET per prediction and holds no connection while it waits.
* the prober: a separate process (``python bench/harness/openloop.py probe``) that GETs a
  URL every ``interval`` seconds on one keep-alive connection and writes one line per
  probe (monotonic start, latency, status), so its figures are not delayed by this
  process's event loop. :func:`start_prober`, :func:`read_probes`.
* ``/proc`` and Prometheus helpers: :func:`rss_bytes`, :func:`metric_value`.

Everything talks to 127.0.0.1 only; every loop is bounded by a count and a time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import heapq
import http.client
import json
import math
import random
import ssl
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

if not __package__:  # run by path (the prober): this checkout's bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx

from bench.harness.load import error_kind
from bench.harness.procs import REPO, Service, clean_env, loopback

TERMINAL = frozenset({"completed", "failed", "canceled"})


@dataclass(slots=True)
class Tracked:
    """One prediction of the load: its schedule, its POST, what the checks saw."""

    index: int
    job_s: float  # the upstream job's duration (asked of the simulator)
    due: float  # scheduled arrival, monotonic
    sent: float = math.nan  # when the POST went out, monotonic
    sent_wall: float = math.nan  # the same, wall clock (to compare with completed_at)
    post_s: float = math.nan  # the POST's latency
    id: str | None = None
    status: str | None = None  # the last status seen
    error: str | None = None  # why the POST (or the checks) failed
    completed_wall: float = math.nan  # the proxy's completed_at, wall clock
    checks: int = 0

    @property
    def lag_s(self) -> float:
        """How late the POST went out (waiting for a free connection)."""
        return self.sent - self.due

    @property
    def overhead_s(self) -> float:
        """The proxy's completed_at minus when the POST was sent minus the job's
        duration: what the proxy added end to end (nan until known)."""
        return self.completed_wall - self.sent_wall - self.job_s


def wall_of(iso: object) -> float:
    """An ISO-8601 timestamp (``...Z``) as a Unix time; nan when absent or not one."""
    if not isinstance(iso, str):
        return math.nan
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.nan


class ClientPool:
    """``size`` httpx clients of one connection each, lent out first in, first out (so
    every connection stays in use). A connection idle for ``keepalive_s`` is not
    reused: well under the server's keep-alive timeout (5 s), which an overloaded
    server's late event loop can fire just as a request arrives (a ReadError).
    Lending waits while all are out: that bounds the requests in flight."""

    def __init__(self, base_url: str, size: int, timeout_s: float,
                 headers: Mapping[str, str] | None = None, keepalive_s: float = 1.0) -> None:
        loopback(base_url)
        tls = ssl.create_default_context()  # one for all (see load.open_clients)
        self.clients = [httpx.AsyncClient(
            base_url=base_url, headers=dict(headers or {}), verify=tls, trust_env=False,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                keepalive_expiry=keepalive_s),
        ) for _ in range(size)]
        self._free: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for client in self.clients:
            self._free.put_nowait(client)

    async def acquire(self) -> httpx.AsyncClient:
        """A free client (waits while all are out); give it back with :meth:`release`."""
        return await self._free.get()

    def release(self, client: httpx.AsyncClient) -> None:
        self._free.put_nowait(client)

    @contextlib.asynccontextmanager
    async def lend(self) -> AsyncIterator[httpx.AsyncClient]:
        client = await self.acquire()
        try:
            yield client
        finally:
            self.release(client)

    @property
    def busy(self) -> int:
        return len(self.clients) - self._free.qsize()

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


async def arrivals(rate: float, duration_s: float, fire: Callable[[float], None]) -> int:
    """Call ``fire(due)`` every ``1/rate`` seconds for ``duration_s`` (``due``: the
    scheduled monotonic time), never waiting for what it started; then wait out the
    rest of the duration. The number fired."""
    start = time.monotonic()
    count = max(0, round(rate * duration_s)) if rate > 0 else 0
    for k in range(count):
        due = start + k / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))  # 0: yield all the same
        fire(due)
    await asyncio.sleep(max(0.0, start + duration_s - time.monotonic()))
    return count


class Checker:
    """Sparse result checks over a :class:`ClientPool`: each prediction once at the
    time it is scheduled for, then every ``every_s`` until terminal, at most
    ``max_checks`` GETs (then it counts as unresolved). ``path`` builds the GET path."""

    def __init__(self, pool: ClientPool, path: Callable[[str], str], *, every_s: float,
                 max_checks: int, parallel: int) -> None:
        self.pool, self.path = pool, path
        self.every_s, self.max_checks = every_s, max_checks
        self._heap: list[tuple[float, int, Tracked]] = []
        self._slots = asyncio.Semaphore(parallel)
        self._tasks: set[asyncio.Task[None]] = set()
        self.gets = 0
        self.error_kinds: collections.Counter[str] = collections.Counter()
        self.first_errors: list[str] = []  # the first few, in full, with when

    def _failed(self, kind: str, detail: str) -> None:
        self.error_kinds[kind] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{time.monotonic():.1f} {kind}: {detail[:200]}")

    def schedule(self, t: Tracked, at: float) -> None:
        heapq.heappush(self._heap, (at, t.index, t))

    @property
    def open(self) -> int:
        """Predictions not yet seen terminal (scheduled or being checked)."""
        return len(self._heap) + len(self._tasks)

    async def run(self, done: Callable[[], bool], deadline: float) -> None:
        """Check what is due until ``done()`` and nothing is open, or ``deadline``
        (monotonic) passes; what is still open then is left unresolved."""
        for _ in range(10_000_000):  # 20 ms per turn at least: far past any deadline
            now = time.monotonic()
            if now >= deadline or (done() and not self.open):
                break
            while self._heap and self._heap[0][0] <= now and not self._slots.locked():
                _, _, t = heapq.heappop(self._heap)
                await self._slots.acquire()
                task = asyncio.create_task(self._check(t))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            nxt = self._heap[0][0] - now if self._heap else 0.05
            await asyncio.sleep(min(0.05, max(0.02, nxt)))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _check(self, t: Tracked) -> None:
        try:
            assert t.id is not None
            async with self.pool.lend() as client:
                r = await client.get(self.path(t.id))
            self.gets += 1
            t.checks += 1
            if r.status_code == 200:
                body = r.json()
                t.status = str(body.get("status"))
                if t.status in TERMINAL:
                    t.completed_wall = wall_of(body.get("completed_at"))
                    return
            else:
                self._failed(f"GET HTTP {r.status_code}", r.text)
        except (httpx.HTTPError, ValueError) as exc:
            t.checks += 1
            self._failed(f"GET {error_kind(exc)}", repr(exc))
        finally:
            self._slots.release()
        if t.checks >= self.max_checks:
            t.error = t.error or "unresolved"
        else:
            self.schedule(t, time.monotonic() + self.every_s)


class PredictionLoad:
    """Async predictions on an open-loop schedule: :meth:`fire` (an :func:`arrivals`
    callback) makes one with a job of a random duration in ``job_range``, POSTs it
    (``body(tracked)``: the JSON body) on a pool of ``connections``, and hands the
    accepted ones to a :class:`Checker` (first check ``check_after`` after the job
    should have ended). ``all`` holds every prediction made, in order."""

    def __init__(self, base: str, headers: Mapping[str, str], *,
                 body: Callable[[Tracked], dict[str, object]], job_range: Sequence[float],
                 connections: int, check_connections: int, check_after: float,
                 max_checks: int, max_backlog: int, seed: int) -> None:
        self.body, self.job_range = body, (float(job_range[0]), float(job_range[1]))
        self.check_after, self.max_backlog = check_after, max_backlog
        self.rng = random.Random(seed)
        headers = {**headers, "content-type": "application/json"}
        self.posts = ClientPool(base, connections, 30.0, headers)
        self.gets = ClientPool(base, check_connections, 30.0, headers)
        self.checker = Checker(self.gets, lambda i: f"/v1/predictions/{i}", every_s=2.0,
                               max_checks=max_checks, parallel=check_connections)
        self.all: list[Tracked] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.waiting: dict[int, asyncio.Task[None]] = {}  # not yet sent: no connection
        self.shed = 0
        self.arriving = True

    def fire(self, due: float) -> None:
        t = Tracked(len(self.all), round(self.rng.uniform(*self.job_range), 3), due)
        self.all.append(t)
        if len(self.tasks) >= self.max_backlog:  # the server is not keeping up
            t.error = "shed (client backlog)"
            self.shed += 1
            return
        task = asyncio.create_task(self._post(t))
        self.tasks.add(task)
        self.waiting[t.index] = task
        task.add_done_callback(self.tasks.discard)

    async def _post(self, t: Tracked) -> None:
        content = json.dumps(self.body(t)).encode()
        try:
            client = await self.posts.acquire()
        finally:
            self.waiting.pop(t.index, None)
        t.sent, t.sent_wall = time.monotonic(), time.time()
        try:
            r = await client.post("/v1/predictions", content=content)
        except httpx.HTTPError as exc:
            t.error = f"POST {error_kind(exc)}"
            return
        finally:
            self.posts.release(client)
        t.post_s = time.monotonic() - t.sent
        if r.status_code != 202:
            t.error = f"POST HTTP {r.status_code}"
            return
        try:
            data = r.json()
            t.id, t.status = str(data["id"]), str(data["status"])
        except (ValueError, KeyError, TypeError):
            t.error = "POST bad body"
            return
        self.checker.schedule(t, t.sent + t.job_s + self.check_after)

    def stop_arriving(self) -> None:
        """No more arrivals; those still waiting for a connection are dropped (what
        is left to wait for is what the server accepted)."""
        self.arriving = False
        for index, task in list(self.waiting.items()):
            self.all[index].error = "not sent (ramp ended)"
            task.cancel()
        self.waiting.clear()

    def done(self) -> bool:
        """No more arrivals and no POST outstanding (the Checker's end condition)."""
        return not self.arriving and not self.tasks

    def finish(self) -> None:
        """After the drain: whatever is neither terminal nor failed is unresolved."""
        for t in self.all:
            if t.error is None and t.status not in TERMINAL:
                t.error = "unresolved (drain)"

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.posts.aclose()
        await self.gets.aclose()


# --------------------------------------------------------------------------- the prober


def start_prober(url: str, out: Path, log: Path, *, interval_s: float, max_s: float,
                 timeout_s: float = 5.0) -> Service:
    """The prober as a child process (this file run by path), writing to ``out``."""
    argv = [sys.executable, str(Path(__file__).resolve()), "probe", "--url", loopback(url),
            "--out", str(out), "--interval", str(interval_s), "--max-s", str(max_s),
            "--timeout", str(timeout_s)]
    return Service("prober", argv, log, env=clean_env(), cwd=REPO)


def read_probes(path: Path, t0: float, t1: float) -> tuple[list[float], int]:
    """The latencies of the probes that started in [t0, t1) (monotonic), and how many
    of them failed (no answer, or not 200; their latency is kept too)."""
    latencies: list[float] = []
    failed = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue
            start, latency, status = float(parts[0]), float(parts[1]), parts[2]
            if t0 <= start < t1:
                latencies.append(latency)
                failed += status != "200"
    return latencies, failed


def probe(url: str, out: Path, interval_s: float, max_s: float, timeout_s: float) -> None:
    """GET ``url`` every ``interval_s`` (or right after the last probe, when it took
    longer) for ``max_s`` seconds; one line per probe: start, latency, status (0: no
    answer)."""
    parts = urllib.parse.urlsplit(loopback(url))
    host, port, path = parts.hostname or "", parts.port or 80, parts.path or "/"

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(host, port, timeout=timeout_s)

    conn = connect()
    start = time.monotonic()
    with out.open("w") as fh:
        nxt = start
        for _ in range(int(max_s / interval_s) + 1):
            t0 = time.monotonic()
            if t0 - start > max_s:
                break
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = connect()
            fh.write(f"{t0:.6f} {time.monotonic() - t0:.6f} {status}\n")
            fh.flush()
            nxt = max(nxt + interval_s, time.monotonic())
            time.sleep(max(0.0, nxt - time.monotonic()))
    conn.close()


# --------------------------------------------------------------------------- /proc, metrics


def rss_bytes(pid: int) -> tuple[int, int]:
    """Resident set size of ``pid`` now and at its peak (VmRSS, VmHWM), in bytes;
    (0, 0) where /proc cannot tell."""
    found = {"VmRSS:": 0, "VmHWM:": 0}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(None, 1)[0]
            if key in found:
                found[key] = int(line.split()[1]) * 1024
    return found["VmRSS:"], found["VmHWM:"]


def metric_value(text: str, name: str) -> float | None:
    """The sum of a Prometheus metric's samples (every label set) in an exposition;
    None when it is absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name): len(name) + 1] in (" ", "{"):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(None, 1)[1])
                seen = True
    return total if seen else None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/harness/openloop.py")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="GET a URL every --interval s; a line per probe")
    p.add_argument("--url", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--max-s", type=float, default=900.0)
    p.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT is how it is stopped
        probe(args.url, args.out, args.interval, args.max_s, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
