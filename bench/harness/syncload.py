"""Open-loop sync predictions round-robin over proxy replicas, and their figures
(``bench/load.py``).

* :class:`Pool`: one-connection httpx clients to one replica, made on demand up to a
  bound and lent last in, first out, so that at a low rate the same warm keep-alive
  connections serve every request (a first-in, first-out pool of hundreds would make
  each request open a new connection) and at a high rate the bound caps the requests
  in flight.
* :class:`SyncLoad`: its :meth:`~SyncLoad.fire` (an ``openloop.arrivals`` callback) sends
  one ``POST /v1/predictions`` with ``enable_sync_mode`` to the next replica in turn and
  records when it was due, sent and answered, how it ended and the proxy's
  ``x-flux-proxy-overhead-ms`` header. Past ``max_backlog`` requests outstanding, an
  arrival is shed (counted as an error) instead of queued without bound.
* :class:`PgBackends`: CPU of the PostgreSQL server processes serving one database
  (``pg_stat_activity``, then ``/proc``), which the machine-wide "other" CPU would
  otherwise hide.
* :class:`Step`: one rate's requests and counters, its figures (:meth:`Step.figures`),
  table row (:func:`cells`), whether the ramp should stop there (:func:`stop_reason`),
  and the best-throughput ratio between replica counts (:func:`best_ratio`).

Everything talks to 127.0.0.1 only; every wait is bounded by a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.harness.cpu import CpuUsage, cpu_seconds
from bench.harness.load import error_kind
from bench.harness.procs import HOST, loopback
from bench.harness.report import percentile

SUBMIT = "/v1/predictions"
MiB = 1024 * 1024
OVERHEAD_HEADER = "x-flux-proxy-overhead-ms"
BODY: dict[str, Any] = {  # overhead_ops.BODY, in sync mode
    "prompt": "a lighthouse at dusk, oil painting", "size": "1024*1024",
    "num_inference_steps": 28, "guidance_scale": 3.5, "num_images": 1,
    "output_format": "jpeg", "enable_sync_mode": True,
}


@dataclass(slots=True)
class Req:
    """One prediction of the load (times: monotonic seconds; nan until known)."""

    replica: int
    due: float  # scheduled arrival
    sent: float = math.nan  # a connection was free and the POST went out
    done: float = math.nan  # the answer (or the failure) came
    error: str | None = None  # None: 200 with status completed
    overhead_ms: float = math.nan  # the proxy's x-flux-proxy-overhead-ms

    @property
    def ok(self) -> bool:
        return self.error is None and not math.isnan(self.done)

    @property
    def e2e_s(self) -> float:
        return self.done - self.sent

    @property
    def lag_s(self) -> float:
        """How late the POST went out (no free connection, or a late event loop)."""
        return self.sent - self.due


class Pool:
    """Up to ``size`` one-connection clients to ``base_url``, made when first needed and
    lent last in, first out; :meth:`acquire` waits while all are out. A connection idle
    for ``keepalive_s`` is not reused (well under uvicorn's 5 s keep-alive timeout)."""

    def __init__(self, base_url: str, size: int, timeout_s: float,
                 headers: Mapping[str, str], tls: ssl.SSLContext,
                 keepalive_s: float = 1.0) -> None:
        self.base_url = loopback(base_url)
        self.headers, self.timeout_s, self.tls = dict(headers), timeout_s, tls
        self.keepalive_s = keepalive_s
        self.made: list[httpx.AsyncClient] = []
        self._free: list[httpx.AsyncClient] = []
        self._slots = asyncio.Semaphore(size)

    async def acquire(self) -> httpx.AsyncClient:
        await self._slots.acquire()
        if self._free:
            return self._free.pop()
        client = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, verify=self.tls, trust_env=False,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                keepalive_expiry=self.keepalive_s))
        self.made.append(client)
        return client

    def release(self, client: httpx.AsyncClient) -> None:
        self._free.append(client)
        self._slots.release()

    async def aclose(self) -> None:
        for client in self.made:
            await client.aclose()


def classify(r: httpx.Response) -> str | None:
    """None for a completed sync answer, else the kind of failure."""
    if r.status_code == 202:
        return "sync timeout (202)"
    if r.status_code != 200:
        return f"HTTP {r.status_code}"
    try:
        status = r.json().get("status")
    except (ValueError, AttributeError):
        return "bad body"
    return None if status == "completed" else f"status {status}"


class SyncLoad:
    """Sync predictions, round-robin over ``bases`` (one :class:`Pool` each of
    ``connections``). ``reqs`` holds the current step's; :meth:`new_step` starts another
    list (the pools, and their warm connections, stay)."""

    def __init__(self, bases: Sequence[str], headers: Mapping[str, str], *,
                 connections: int, timeout_s: float, max_backlog: int) -> None:
        tls = ssl.create_default_context()  # one for all (see harness/load.open_clients)
        headers = {**headers, "content-type": "application/json"}
        self.pools = [Pool(b, connections, timeout_s, headers, tls) for b in bases]
        self.max_backlog = max_backlog
        self.reqs: list[Req] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.sent_total = 0

    def new_step(self) -> list[Req]:
        self.reqs = []
        return self.reqs

    def fire(self, due: float) -> None:
        n = self.sent_total
        self.sent_total += 1
        req = Req(n % len(self.pools), due)
        self.reqs.append(req)
        if len(self.tasks) >= self.max_backlog:
            req.error = "shed (client backlog)"
            return
        task = asyncio.create_task(self._send(req, json.dumps(BODY | {"seed": n}).encode()))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, req: Req, content: bytes) -> None:
        pool = self.pools[req.replica]
        client = await pool.acquire()
        req.sent = time.monotonic()
        try:
            r = await client.post(SUBMIT, content=content)
        except httpx.TimeoutException:
            req.error = "client timeout"
        except httpx.HTTPError as exc:
            req.error = error_kind(exc)
        else:
            req.error = classify(r)
            with contextlib.suppress(TypeError, ValueError):
                req.overhead_ms = float(r.headers.get(OVERHEAD_HEADER))
        finally:
            req.done = time.monotonic()
            pool.release(client)

    async def drain(self, timeout_s: float) -> int:
        """Wait (at most ``timeout_s``) for every request out; those still out then are
        cancelled and count as errors. The number cancelled."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout_s)
        left = list(self.tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        for req in self.reqs:
            if math.isnan(req.done) and req.error is None:
                req.error = "unfinished (drain)"
        return len(left)

    async def aclose(self) -> None:
        await self.drain(0.0)
        for pool in self.pools:
            await pool.aclose()


class PgBackends:
    """CPU of the PostgreSQL backends connected to one database (not this one's own),
    read from ``/proc`` (the server runs on this machine: 127.0.0.1)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        self.database = parsed.database or ""
        self._kw: dict[str, Any] = {
            "host": parsed.host or HOST, "port": parsed.port or 5432,
            "user": parsed.username or "postgres", "password": parsed.password}
        self._conn: Any = None

    async def sample(self) -> dict[int, float]:
        """pid -> CPU seconds so far, of each backend of the database ({} on failure)."""
        import asyncpg

        try:
            if self._conn is None:
                self._conn = await asyncpg.connect(database=self.database, timeout=10,
                                                   **self._kw)
            rows = await self._conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                "AND pid <> pg_backend_pid()", self.database, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return {}
        out = {int(r["pid"]): cpu_seconds(int(r["pid"])) for r in rows}
        return {pid: s for pid, s in out.items() if not math.isnan(s)}

    @staticmethod
    def spent(before: Mapping[int, float], after: Mapping[int, float]) -> float:
        """CPU seconds between two samples: a backend new in ``after`` counts whole (it
        started within the window); one gone by then is lost (nan: no samples)."""
        if not before and not after:
            return math.nan
        return sum(s - before.get(pid, 0.0) for pid, s in after.items())

    async def aclose(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


# --------------------------------------------------------------------------- a step's figures


@dataclass
class Step:
    """One rate on one replica count: its requests and what was counted meanwhile."""

    replicas: int
    rate: float
    job_s: float
    w0: float = math.nan  # the measured window, monotonic
    w1: float = math.nan
    reqs: list[Req] = field(default_factory=list)
    cpu: CpuUsage | None = None
    pg_cpu_s: float = math.nan
    polls: int = -1  # GETs the simulator answered in the window (-1: unknown)
    rss_peak: list[int] = field(default_factory=list)  # per replica, bytes
    stop: str = ""  # why the rate stopped rising after this step

    def figures(self) -> dict[str, Any]:
        wall = self.w1 - self.w0
        win = [r for r in self.reqs if self.w0 <= r.due < self.w1]
        ok = [r for r in win if r.ok]
        done_in = sum(1 for r in self.reqs if r.ok and self.w0 <= r.done <= self.w1)
        e2e = [r.e2e_s for r in ok]
        head = [r.overhead_ms for r in ok if not math.isnan(r.overhead_ms)]
        lags = [r.lag_s for r in win if not math.isnan(r.sent)]
        kinds: dict[str, int] = {}
        for r in win:
            if r.error is not None:
                kinds[r.error] = kinds.get(r.error, 0) + 1
        cpu = self.cpu
        trees = cpu.trees if cpu else {}
        replica_s = [v for k, v in trees.items() if k.startswith("replica")]
        other = cpu.other_s - (0.0 if math.isnan(self.pg_cpu_s) else self.pg_cpu_s) \
            if cpu else math.nan

        def cores(seconds: float) -> float:
            return seconds / wall if wall > 0 else math.nan

        return {
            "replicas": self.replicas, "rate": self.rate, "window_s": round(wall, 2),
            "arrivals": len(win), "ok": len(ok), "errors": sum(kinds.values()),
            "error_kinds": kinds, "done_per_s": done_in / wall if wall > 0 else math.nan,
            "e2e_p50_ms": percentile(e2e, 50) * 1000, "e2e_p99_ms": percentile(e2e, 99) * 1000,
            "header_p50_ms": percentile(head, 50), "header_p99_ms": percentile(head, 99),
            "minus_job_p50_ms": (percentile(e2e, 50) - self.job_s) * 1000,
            "minus_job_p99_ms": (percentile(e2e, 99) - self.job_s) * 1000,
            "lag_p99_ms": percentile(lags, 99) * 1000,
            "rss_peak_mib": [b / MiB for b in self.rss_peak],
            "polls_per_pred": self.polls / done_in if done_in and self.polls >= 0 else math.nan,
            "cpu_ms_per_pred": sum(replica_s) / done_in * 1000 if done_in else math.nan,
            "replica_cores": [cores(s) for s in replica_s],
            "sim_cores": cores(trees.get("simulator", math.nan)),
            "pg_cores": cores(self.pg_cpu_s),
            "client_cores": cores(cpu.own_s) if cpu else math.nan,
            "other_cores": cores(max(0.0, other)), "stop": self.stop,
        }


HEADERS = ["replicas", "rate/s", "sent", "done/s", "e2e p50 / p99 ms", "overhead hdr p50 / p99 ms",
           "e2e - job p50 / p99 ms", "lag p99 ms", "errors", "RSS MiB per replica",
           "polls/pred", "CPU ms/pred", "replica cores", "sim / PG / client / other cores"]


def _num(v: float, fmt: str = ".0f") -> str:
    return "-" if math.isnan(v) else format(v, fmt)


def cells(f: dict[str, Any]) -> list[str]:
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(f["error_kinds"].items()))
    return [str(f["replicas"]), _num(f["rate"]), str(f["arrivals"]), _num(f["done_per_s"], ".1f"),
            f"{_num(f['e2e_p50_ms'])} / {_num(f['e2e_p99_ms'])}",
            f"{_num(f['header_p50_ms'], '.1f')} / {_num(f['header_p99_ms'], '.1f')}",
            f"{_num(f['minus_job_p50_ms'])} / {_num(f['minus_job_p99_ms'])}",
            _num(f["lag_p99_ms"], ".1f"),
            f"{f['errors']} ({kinds})" if kinds else "0",
            " / ".join(_num(m) for m in f["rss_peak_mib"]), _num(f["polls_per_pred"], ".1f"),
            _num(f["cpu_ms_per_pred"], ".2f"),
            " + ".join(_num(c, ".2f") for c in f["replica_cores"]),
            " / ".join(_num(f[k], ".2f") for k in ("sim_cores", "pg_cores", "client_cores",
                                                   "other_cores"))]


def stop_reason(f: dict[str, Any], job_s: float) -> str:
    """Why a replica count should not go to a higher rate after this step ('' if not)."""
    if f["arrivals"] and f["errors"] > 0.05 * f["arrivals"]:
        return f"errors {f['errors']}/{f['arrivals']} > 5%"
    if f["e2e_p99_ms"] > 10 * job_s * 1000:
        return f"p99 {f['e2e_p99_ms']:.0f} ms > 10x the job latency"
    if f["done_per_s"] < 0.7 * f["rate"]:
        return f"{f['done_per_s']:.1f}/s done < 70% of {f['rate']:g}/s offered (saturated)"
    return ""


def best_ratio(figures: Sequence[dict[str, Any]], replicas: Sequence[int]) -> dict[str, float]:
    """The best completed/s of each replica count beyond the first, over the first's."""
    best = {n: max((f["done_per_s"] for f in figures if f["replicas"] == n
                    and not math.isnan(f["done_per_s"])), default=math.nan) for n in replicas}
    base = best[replicas[0]]
    return {f"{n} / {replicas[0]} replica(s), best done/s": best[n] / base
            for n in replicas[1:] if base > 0}
