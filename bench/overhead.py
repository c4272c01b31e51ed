"""What the proxy adds: flux-proxy in front of a WaveSpeed simulator vs the simulator alone.

Three processes on 127.0.0.1 (the machine this was written for has 2 cores):

* a WaveSpeed simulator (`flux-proxy simulate wavespeed`) with a fixed job latency;
* the proxy (`flux-proxy serve`), configured by a temporary TOML file, routing only to
  that simulator, on a fresh SQLite file (or a dedicated PostgreSQL database);
* this process, the load generator: httpx.AsyncClient, one connection per worker.

Two modes, each at concurrency 1 and 200 (closed loop: every worker sends its next
request when the previous one ends):

* ``sync``: one POST with ``enable_sync_mode: true``. Direct: the simulator's own sync
  mode; via the proxy: the proxy's sync mode, which uses WaveSpeed's native sync.
* ``poll``: POST asynchronously, then GET every ``--poll-interval`` seconds until the
  status is terminal. Direct: the simulator's submit + ``/result`` API; via the proxy:
  ``POST /v1/predictions`` + ``GET /v1/predictions/{id}`` (the proxy itself polls the
  simulator every ``--poll-interval`` too). Reported as three rows: ``poll e2e`` (submit
  until the client sees the terminal state), ``poll POST`` and ``poll GET`` (each call).

"added" is proxy percentile minus direct percentile (requests are not paired). The
``proxy CPU ms/pred`` column is the proxy process's user+system CPU time over the
measured window divided by the predictions done (for ``poll``: one POST, its GETs and
the proxy's own upstream polls): what one prediction costs the proxy.

    .venv/bin/python bench/overhead.py                 # the full run (a few minutes)
    .venv/bin/python bench/overhead.py --quick         # smoke run (< 30 s)
    .venv/bin/python bench/overhead.py --db sqlite,postgres --json out.json
    .venv/bin/python bench/overhead.py --profile prof/ # proxy under py-spy (slower)

Where the proxy has client API keys, one is created (`flux-proxy keys create`) and
sent, so requests pay for authentication as real ones do.

Every loop is bounded by a count and a time limit; the script stops by itself and
always stops the processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import math
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
SIM_KEY = "sim-key"
SIM_SUBMIT = "/api/v3/wavespeed-ai/flux-dev"
SIM_RESULT = "/api/v3/predictions/{id}/result"
PROXY_SUBMIT = "/v1/predictions"
PROXY_GET = "/v1/predictions/{id}"
BODY: dict[str, Any] = {
    "prompt": "a lighthouse at dusk, oil painting",
    "size": "1024*1024",
    "num_inference_steps": 28,
    "guidance_scale": 3.5,
    "num_images": 1,
    "seed": 1234,
    "output_format": "jpeg",
}
PROXY_TERMINAL = frozenset({"completed", "failed", "canceled"})
SIM_TERMINAL = frozenset({"completed", "failed", "cancelled", "canceled", "timeout", "deleted"})
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/flux_bench"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
OTHER_LOAD_WARN = 0.15  # cores' worth of foreign CPU that makes a window suspect
MAX_POLLS = 10_000  # per prediction; the op timeout ends it long before in practice


class BenchError(Exception):
    """One operation did not end as it should (wrong status, bad body, not terminal)."""


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Series:
    """Latencies of one kind of operation in one measured window."""

    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    proxy_cpu_s: float | None = None
    sim_cpu_s: float | None = None
    client_cpu_s: float | None = None
    # CPU the machine spent on anything but the simulator, the proxy and this process
    # (other workloads; PostgreSQL's server processes on the postgres runs).
    other_cpu_s: float | None = None
    truncated: bool = False

    @property
    def n(self) -> int:
        return len(self.latencies_s)

    def p(self, q: float) -> float:
        return percentile(self.latencies_s, q)

    @property
    def rps(self) -> float:
        return self.n / self.wall_s if self.wall_s > 0 else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "wall_s": round(self.wall_s, 4),
            "rps": round(self.rps, 2),
            "p50_ms": round(self.p(50) * 1000, 3),
            "p90_ms": round(self.p(90) * 1000, 3),
            "p99_ms": round(self.p(99) * 1000, 3),
            "max_ms": round(self.p(100) * 1000, 3),
            "mean_ms": round(sum(self.latencies_s) / self.n * 1000, 3) if self.n else None,
            "proxy_cpu_s": self.proxy_cpu_s,
            "sim_cpu_s": self.sim_cpu_s,
            "client_cpu_s": self.client_cpu_s,
            "other_cpu_s": self.other_cpu_s,
            "truncated": self.truncated,
        }


@dataclass
class Row:
    db: str
    mode: str
    concurrency: int
    direct: Series
    proxy: Series

    def other_load(self) -> float:
        """The larger of the two windows' foreign CPU, in cores (0.0 when unknown).
        PostgreSQL's own server processes count as foreign (they are not ours to watch)."""
        loads = [s.other_cpu_s / s.wall_s for s in (self.direct, self.proxy)
                 if s.other_cpu_s is not None and s.wall_s > 0]
        return max(loads, default=0.0)

    def cells(self) -> list[str]:
        d, p = self.direct, self.proxy

        def ms(v: float) -> str:
            return "-" if math.isnan(v) else f"{v * 1000:.1f}"

        cpu = "-"  # per prediction: on the e2e rows only (the POST/GET rows share it)
        if p.proxy_cpu_s is not None and p.n and self.mode in ("sync", "poll e2e"):
            cpu = f"{p.proxy_cpu_s / p.n * 1000:.2f}"
        return [
            self.db,
            self.mode,
            str(self.concurrency),
            f"{d.n}/{p.n}",
            ms(d.p(50)),
            ms(d.p(99)),
            ms(p.p(50)),
            ms(p.p(99)),
            ms(p.p(50) - d.p(50)),
            ms(p.p(99) - d.p(99)),
            f"{d.rps:.0f}",
            f"{p.rps:.0f}",
            cpu,
            f"{d.errors}/{p.errors}" + (" (cut)" if d.truncated or p.truncated else ""),
        ]


HEADERS = [
    "db",
    "mode",
    "conc",
    "n d/p",
    "direct p50",
    "direct p99",
    "proxy p50",
    "proxy p99",
    "added p50",
    "added p99",
    "rps direct",
    "rps proxy",
    "proxy CPU ms/pred",
    "errors d/p",
]


def render_table(rows: Sequence[Row]) -> str:
    """A Markdown table (latencies in ms)."""
    lines = [HEADERS, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [fmt(HEADERS), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    out += [fmt(r.cells()) for r in rows]
    noisy = [r for r in rows if r.other_load() > OTHER_LOAD_WARN]
    if noisy:
        out.append("")
        out += [f"note: {r.db} {r.mode} c={r.concurrency}: other processes used "
                f"{r.other_load():.0%} of a core during the measurement" for r in noisy]
    return "\n".join(out)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 64:
        current = todo.pop()
        out.append(current)
        children = Path(f"/proc/{current}/task/{current}/children")
        with contextlib.suppress(OSError):
            todo += [int(c) for c in children.read_text().split()]
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (Linux /proc/stat)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle, iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    return math.nan


def wait_quiet(max_wait_s: float, log: Callable[[str], None], window_s: float = 3.0) -> bool:
    """Wait (at most max_wait_s) until the machine is idle: under OTHER_LOAD_WARN cores
    busy over two consecutive windows. False when it never was."""
    deadline = time.monotonic() + max_wait_s
    quiet = 0
    while time.monotonic() < deadline:
        busy0 = machine_busy_seconds()
        time.sleep(window_s)
        load = (machine_busy_seconds() - busy0) / window_s
        quiet = quiet + 1 if load < OTHER_LOAD_WARN else 0
        if quiet >= 2:
            return True
        log(f"waiting for a quiet machine: {load:.2f} cores busy")
    return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process tree, in seconds (0.0 where /proc is missing)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the benchmark dies, however it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Service:
    """A child process in its own process group, with its output in a log file; it is
    stopped by `stop()`, and by the kernel if this process dies first."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, url: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready at {url} in {timeout_s:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGINT to the whole group (uvicorn shuts down; py-spy writes its profile),
        then SIGKILL if it is still there after STOP_TIMEOUT_S."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
        self._fh.close()


def _cli() -> list[str]:
    """How to run `flux-proxy`: the console script beside this interpreter, if any."""
    script = Path(sys.executable).with_name("flux-proxy")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "proxy.cli"]


def _clean_env() -> dict[str, str]:
    """The environment minus anything that would configure the proxy behind our back."""
    prefixes = ("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_", "LOCAL_WORKER")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def start_simulator(port: int, job_latency_s: float, workdir: Path) -> Service:
    argv = [*_cli(), "simulate", "wavespeed", "--host", HOST, "--port", str(port),
            "--job-latency", str(job_latency_s), "--api-key", SIM_KEY]
    sim = Service("simulator", argv, _clean_env(), workdir / "simulator.log")
    sim.wait_ready(f"http://{HOST}:{port}/_sim/health")
    return sim


def proxy_toml(port: int, sim_port: int, database_url: str, poll_interval_s: float) -> str:
    return f"""\
host = "{HOST}"
port = {port}
database_url = "{database_url}"
log_level = "warning"
instance_id = "bench"
sync_timeout_s = 60.0

[routing]
order = ["wavespeed"]

[providers.wavespeed]
base_url = "http://{HOST}:{sim_port}"
api_key = "{SIM_KEY}"
# The proxy polls the simulator at the client's fixed interval (no backoff), so that
# "poll e2e" compares like with like.
poll_initial_s = {poll_interval_s}
poll_multiplier = 1.0
poll_max_s = {poll_interval_s}
read_timeout_s = 60.0
max_connections = 400

[providers.vibedream]
enabled = false
"""


def start_proxy(
    port: int, sim_port: int, database_url: str, poll_interval_s: float, workdir: Path, tag: str
) -> tuple[Service, str | None]:
    """The running proxy, and a client API key for it (None: this version has no keys)."""
    config = workdir / f"proxy-{tag}.toml"
    config.write_text(proxy_toml(port, sim_port, database_url, poll_interval_s))
    env = _clean_env() | {"FLUX_PROXY_CONFIG": str(config)}
    proxy = Service(f"proxy[{tag}]", [*_cli(), "serve"], env, workdir / f"proxy-{tag}.log")
    try:
        proxy.wait_ready(f"http://{HOST}:{port}/healthz")
        return proxy, create_api_key(env, f"bench-{os.getpid()}-{port}")
    except BaseException:
        proxy.stop()
        raise


def create_api_key(env: dict[str, str], name: str) -> str | None:
    """`flux-proxy keys create` against the proxy's database: requests then pay for
    authentication as real clients do. None when this version has no `keys` command
    (it has no client authentication either)."""
    probe = subprocess.run([*_cli(), "keys", "--help"], env=env, capture_output=True,
                           text=True, timeout=60, check=False)
    if probe.returncode != 0:
        return None
    done = subprocess.run([*_cli(), "keys", "create", "--name", name], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("key: "):
            return line.removeprefix("key: ").strip()
    raise RuntimeError(f"`flux-proxy keys create` failed ({done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()[-500:]}")


class Profiler:
    """`py-spy record` attached to a running process for one measured window.

    --gil: only the thread holding the GIL is sampled, i.e. where Python spends CPU
    (without it, threads blocked in C -- aiosqlite's queue waits -- look busy).
    Stopped with SIGINT, on which py-spy writes its raw (collapsed) stacks.
    """

    def __init__(self, pid: int, output: Path, rate: int) -> None:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.output = output
        self.log = output.with_suffix(".log")
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--gil", "--format", "raw",
             "--rate", str(rate), "--output", str(output), "--nonblocking"],
            stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def stop(self) -> str | None:
        """Stop sampling; the summary of what was recorded (None if nothing was)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S * 3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self._fh.close()
        if not self.output.exists():
            return None
        summary = summarize_profile(self.output)
        self.output.with_name(self.output.stem + "-summary.txt").write_text(summary + "\n")
        return summary


async def reset_postgres(url: str, *, force: bool = False) -> None:
    """Create the benchmark database if missing and empty its `public` schema (every
    table any proxy version made there), so migrations start from nothing.

    Only a database whose name starts with `flux_bench` is touched (unless `force`),
    so a typo cannot wipe the test database.
    """
    import asyncpg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = parsed.database or ""
    if not name.startswith("flux_bench") and not force:
        raise SystemExit(f"refusing to reset PostgreSQL database {name!r}: "
                         "use a database named flux_bench* (or --pg-force)")
    kw: dict[str, Any] = {"host": parsed.host or HOST, "port": parsed.port or 5432,
                          "user": parsed.username or "postgres", "password": parsed.password}
    admin = await asyncpg.connect(database="postgres", timeout=10, **kw)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(database=name, timeout=10, **kw)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


# --------------------------------------------------------------------------- operations

Samples = dict[str, list[float]]
Op = Callable[[httpx.AsyncClient], Awaitable[Samples]]


def _json_body(response: httpx.Response, expect: tuple[int, ...]) -> dict[str, Any]:
    if response.status_code not in expect:
        raise BenchError(f"HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        raise BenchError("body is not JSON") from None
    if not isinstance(body, dict):
        raise BenchError("body is not a JSON object")
    return body


def _why(error: object) -> str:
    """The start of a failed prediction's error text, to tell failures apart."""
    return f": {str(error)[:90]}" if error else ""


def _sim_data(body: dict[str, Any]) -> dict[str, Any]:
    data = body.get("data")
    if body.get("code") != 200 or not isinstance(data, dict):
        raise BenchError(f"envelope code {body.get('code')}")
    return data


class Target:
    """One side of the comparison: how to do a sync request and a submit+poll."""

    def __init__(self, name: str, base_url: str, poll_interval_s: float) -> None:
        self.name = name
        self.base_url = base_url
        self.poll_interval_s = poll_interval_s
        self.bearer: str | None = SIM_KEY if name == "direct" else None
        self.clients: list[httpx.AsyncClient] = []

    async def open(self, workers: int, op_timeout_s: float) -> None:
        """One client with one connection per worker. A single shared client with a
        pool of 200 costs ~10 ms of CPU per request here (httpcore scans its whole
        pool on every request and release), which would swamp what we measure."""
        headers = {"Authorization": f"Bearer {self.bearer}"} if self.bearer else {}
        # Plain http on loopback; one shared TLS context all the same, because httpx
        # builds (and loads CA certificates into) one per client otherwise: ~30 ms each.
        tls = ssl.create_default_context() if workers > len(self.clients) else None
        while len(self.clients) < workers:
            self.clients.append(httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                verify=tls or True,
                timeout=httpx.Timeout(op_timeout_s),
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            ))

    async def close(self) -> None:
        clients, self.clients = self.clients, []
        for client in clients:
            await client.aclose()

    def op(self, mode: str) -> Op:
        table: dict[tuple[bool, str], Op] = {
            (True, "sync"): self._direct_sync,
            (True, "poll"): self._direct_poll,
            (False, "sync"): self._proxy_sync,
            (False, "poll"): self._proxy_poll,
        }
        return table[(self.name == "direct", mode)]

    # -- direct: the simulator's own WaveSpeed API

    async def _direct_sync(self, client: httpx.AsyncClient) -> Samples:
        t0 = time.perf_counter()
        r = await client.post(SIM_SUBMIT, json=BODY | {"enable_sync_mode": True})
        elapsed = time.perf_counter() - t0
        data = _sim_data(_json_body(r, (200,)))
        if data.get("status") != "completed":
            raise BenchError(f"sync status {data.get('status')}")
        return {"e2e": [elapsed]}

    async def _direct_poll(self, client: httpx.AsyncClient) -> Samples:
        t0 = time.perf_counter()
        r = await client.post(SIM_SUBMIT, json=BODY)
        posted = time.perf_counter()
        data = _sim_data(_json_body(r, (200,)))
        job_id = data.get("id")
        if not isinstance(job_id, str):
            raise BenchError("no id")
        gets = await self._poll_until(client, SIM_RESULT.format(id=job_id), direct=True)
        return {"e2e": [time.perf_counter() - t0], "post": [posted - t0], "get": gets}

    # -- via the proxy

    async def _proxy_sync(self, client: httpx.AsyncClient) -> Samples:
        t0 = time.perf_counter()
        r = await client.post(PROXY_SUBMIT, json=BODY | {"enable_sync_mode": True})
        elapsed = time.perf_counter() - t0
        body = _json_body(r, (200, 202))
        if r.status_code != 200 or body.get("status") != "completed":
            raise BenchError(f"sync answer {r.status_code} {body.get('status')}"
                             + _why(body.get("error")))
        return {"e2e": [elapsed]}

    async def _proxy_poll(self, client: httpx.AsyncClient) -> Samples:
        t0 = time.perf_counter()
        r = await client.post(PROXY_SUBMIT, json=BODY)
        posted = time.perf_counter()
        body = _json_body(r, (202,))
        pred_id = body.get("id")
        if not isinstance(pred_id, str):
            raise BenchError("no id")
        gets = await self._poll_until(client, PROXY_GET.format(id=pred_id), direct=False)
        return {"e2e": [time.perf_counter() - t0], "post": [posted - t0], "get": gets}

    async def _poll_until(
        self, client: httpx.AsyncClient, path: str, *, direct: bool
    ) -> list[float]:
        """GET every poll_interval_s until terminal; the latency of each GET."""
        gets: list[float] = []
        for _ in range(MAX_POLLS):
            await asyncio.sleep(self.poll_interval_s)
            t = time.perf_counter()
            r = await client.get(path)
            gets.append(time.perf_counter() - t)
            body = _json_body(r, (200,))
            data = _sim_data(body) if direct else body
            status = data.get("status")
            if status in (SIM_TERMINAL if direct else PROXY_TERMINAL):
                if status != "completed":
                    raise BenchError(f"ended {status}" + _why(data.get("error")))
                return gets
        raise BenchError("never terminal")


# --------------------------------------------------------------------------- load


@dataclass
class Window:
    samples: Samples
    errors: int
    error_kinds: dict[str, int]
    wall_s: float
    truncated: bool


async def run_load(
    op: Op,
    clients: Sequence[httpx.AsyncClient],
    n: int,
    *,
    op_timeout_s: float,
    window_s: float,
    ramp_s: float = 0.0,
    warmup: int = 0,
    on_measure: Callable[[], None] | None = None,
) -> Window:
    """`warmup` then `n` operations over closed-loop workers (one per client).

    Warm-up and measurement are one continuous run, so the workers keep their phases:
    the first `warmup` operations are not recorded, and the window (wall time, and
    `on_measure`, called once, for CPU counters) starts when the first recorded one is
    issued. `ramp_s`: worker i starts i/len(clients) * ramp_s late, so that long jobs
    do not arrive in synchronized waves. Bounded by `window_s` (no operation starts
    after it) and `op_timeout_s` per operation.
    """
    samples: Samples = collections.defaultdict(list)
    kinds: collections.Counter[str] = collections.Counter()
    total = warmup + n
    issued = 0
    start = time.perf_counter()
    stop_at = time.monotonic() + window_s

    def begin() -> None:
        nonlocal start
        start = time.perf_counter()
        if on_measure is not None:
            on_measure()

    if warmup == 0:
        begin()

    async def worker(index: int, client: httpx.AsyncClient) -> None:
        nonlocal issued
        if ramp_s > 0:
            await asyncio.sleep(ramp_s * index / len(clients))
        while issued < total and time.monotonic() < stop_at:
            issued += 1
            recorded = issued > warmup
            if recorded and issued == warmup + 1 and warmup:
                begin()
            try:
                got = await asyncio.wait_for(op(client), timeout=op_timeout_s)
            except BenchError as exc:
                if recorded:
                    kinds[str(exc)] += 1
            except TimeoutError:
                if recorded:
                    kinds["op timeout"] += 1
            except httpx.HTTPError as exc:
                if recorded:
                    kinds[type(exc).__name__] += 1
            else:
                if recorded:
                    for key, values in got.items():
                        samples[key].extend(values)

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients)))
    wall = time.perf_counter() - start
    return Window(dict(samples), sum(kinds.values()), dict(kinds), wall, issued < total)


@dataclass
class Plan:
    modes: list[str]
    concurrencies: list[int]
    requests: int
    serial_requests: int
    warmup: int
    op_timeout_s: float
    cell_timeout_s: float
    ramp_s: float = 0.0

    def n_for(self, concurrency: int) -> int:
        return self.serial_requests if concurrency == 1 else self.requests


SERIES = {"sync": [("sync", "e2e")],
          "poll": [("poll e2e", "e2e"), ("poll POST", "post"), ("poll GET", "get")]}


async def measure(
    target: Target,
    mode: str,
    concurrency: int,
    plan: Plan,
    watch: dict[str, int],
    profile: Callable[[], Profiler] | None = None,
) -> dict[str, Series]:
    """Warm up, then one measured window; a Series per row label of `mode`.
    `profile`: starts a profiler when the measured window starts (py-spy takes a
    moment to attach, so the first few hundred ms go unsampled)."""
    op = target.op(mode)
    # Warm-up opens every worker's connection (at least `concurrency` operations);
    # --warmup 0 skips it (the smoke run).
    warm = min(max(plan.warmup, concurrency), plan.n_for(concurrency)) if plan.warmup else 0
    # Fresh connections per cell: ones idle since an earlier cell may be closed by the
    # server's keep-alive timeout just as they are reused (a spurious ReadError).
    await target.close()
    await target.open(concurrency, plan.op_timeout_s)
    clients = target.clients[:concurrency]
    profiler: Profiler | None = None
    before: dict[str, float] = {}

    def on_measure() -> None:
        nonlocal profiler
        if profile is not None:
            profiler = profile()
        before.update({name: cpu_seconds(pid) for name, pid in watch.items()})
        before["busy"] = machine_busy_seconds()
        before["client"] = time.process_time()

    try:
        window = await run_load(op, clients, plan.n_for(concurrency), warmup=warm,
                                on_measure=on_measure, op_timeout_s=plan.op_timeout_s,
                                window_s=plan.cell_timeout_s, ramp_s=plan.ramp_s)
    finally:
        summary = profiler.stop() if profiler is not None else None
    if before:
        client_cpu = time.process_time() - before["client"]
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in watch.items()}
        other = machine_busy_seconds() - before["busy"] - client_cpu - sum(cpu.values())
    else:  # the cell ran out of time during the warm-up: nothing was measured
        client_cpu, cpu, other = 0.0, dict.fromkeys(watch, 0.0), 0.0
    if summary:
        print(summary, file=sys.stderr, flush=True)
    if window.wall_s > 0 and other / window.wall_s > OTHER_LOAD_WARN:
        print(f"  warning: {target.name} {mode} c={concurrency}: other processes used "
              f"{other / window.wall_s:.0%} of a core meanwhile", file=sys.stderr, flush=True)
    if window.error_kinds:
        print(f"  {target.name} {mode} c={concurrency} errors: {window.error_kinds}",
              file=sys.stderr, flush=True)
    out: dict[str, Series] = {}
    for label, key in SERIES[mode]:
        out[label] = Series(
            latencies_s=window.samples.get(key, []),
            errors=window.errors,
            error_kinds=window.error_kinds,
            wall_s=window.wall_s,
            proxy_cpu_s=cpu.get("proxy") if target.name == "proxy" else None,
            sim_cpu_s=cpu.get("simulator"),
            client_cpu_s=client_cpu,
            other_cpu_s=max(0.0, other),
            truncated=window.truncated,
        )
    return out


# --------------------------------------------------------------------------- profile summary


_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("sqlite driver (aiosqlite/sqlite3)", ("aiosqlite/", "sqlite3/")),
    ("postgres driver (asyncpg)", ("asyncpg/",)),
    ("SQLAlchemy ORM/Core", ("sqlalchemy/", "sqlmodel/")),
    ("alembic", ("alembic/",)),
    ("httpx/httpcore (upstream calls)", ("httpx/", "httpcore/", "h11/", "anyio/")),
    ("pydantic (validation)", ("pydantic/", "pydantic_core/", "pydantic_settings/")),
    ("msgspec / json", ("msgspec/", "json/")),
    ("structlog", ("structlog/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("tenacity", ("tenacity/",)),
    ("litestar", ("litestar/",)),
    ("uvicorn/httptools", ("uvicorn/", "httptools/")),
    ("asyncio/uvloop", ("asyncio/", "uvloop/", "concurrent/", "threading.py", "queue.py")),
]


def _frame_file(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    start = frame.rfind("(")
    return frame[start + 1 :] if start >= 0 else frame


def _category(frame: str) -> str | None:
    where = _frame_file(frame)
    if "/proxy/" in where or where.startswith("proxy/"):
        return "proxy/ (own code)"
    if "/providers/" in where or where.startswith("providers/"):
        return "providers/ (own code)"
    for name, needles in _CATEGORIES:
        if any(n in where for n in needles):
            return name
    return None


_DB_FRAMES = ("proxy/store/", "sqlalchemy/", "aiosqlite/", "asyncpg/", "sqlmodel/")
_HTTP_OUT_FRAMES = ("providers/_http.py", "httpx/", "httpcore/")


def _activity(frames: list[str]) -> str:
    """What the proxy was doing in one sample (py-spy stack, root first)."""
    if frames and "threading.py" in frames[0]:
        if any("aiosqlite/" in f for f in frames):
            return "DB: aiosqlite worker threads"
        return "other threads"
    # Frames below the event loop's run(): one task's (or callback's) stack. Stacks
    # without it are SQLAlchemy's greenlets (its sync core runs in one per await_),
    # or stacks py-spy could unwind only in part: judged by the frames they hold.
    root = max((i for i, f in enumerate(frames) if "asyncio/runners.py" in f), default=-1)
    task = [f for f in frames[root + 1 :] if f.strip("() ")]
    text = ";".join(task)
    if not task:
        return "event loop itself (uvloop, scheduling)" if root >= 0 else "other (partial stacks)"
    if "proxy/store/" in text or any(d in task[0] for d in _DB_FRAMES):
        return "DB: store calls (SQLAlchemy + driver)"
    if any(h in text for h in _HTTP_OUT_FRAMES):
        return "upstream HTTP calls (httpx)"
    if "proxy/api/" in text or "proxy/schema.py" in text:
        return "route handlers (parse, validate, render)"
    if any(w in text for w in ("uvicorn/", "litestar/", "httptools")):
        return "serving HTTP (uvicorn, litestar, middleware)"
    if "proxy/" in text or "providers/" in text:
        return "runner/service own code (routing, metrics, logs)"
    return "other (partial stacks, asyncio internals)"


def summarize_profile(path: Path, top: int = 25) -> str:
    """Read py-spy's raw (collapsed) output: where the proxy's samples went.

    Four views: by activity (DB, upstream calls, serving requests, ...), by the library
    the sampled frame is in (leaf-most known frame), own-code functions by inclusive
    samples, and leaf functions by self samples.
    """
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if stack and number.isdigit():
            stacks.append((stack.split(";"), int(number)))
    total = sum(c for _, c in stacks) or 1
    by_cat: collections.Counter[str] = collections.Counter()
    by_activity: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        cat = "other"
        for frame in reversed(frames):
            found = _category(frame)
            if found is not None:
                cat = found
                break
        by_cat[cat] += count
        by_activity[_activity(frames)] += count
        leaf[frames[-1]] += count
        seen = set()
        for frame in frames:
            if _category(frame) in ("proxy/ (own code)", "providers/ (own code)"):
                name = frame.split(" (")[0] + " (" + _short(_frame_file(frame)) + ")"
                if name not in seen:
                    seen.add(name)
                    inclusive[name] += count

    def pct(c: int) -> str:
        return f"{100 * c / total:5.1f}%"

    out = [f"profile {path.name}: {total} samples"]
    out.append("\nby activity (what the sampled task was doing):")
    out += [f"  {pct(c)}  {name}" for name, c in by_activity.most_common()]
    out.append("\nby library (leaf-most known frame):")
    out += [f"  {pct(c)}  {name}" for name, c in by_cat.most_common()]
    out.append(f"\nown code, inclusive (top {top}):")
    out += [f"  {pct(c)}  {name}" for name, c in inclusive.most_common(top)]
    out.append(f"\nleaf functions, self (top {top}):")
    out += [f"  {pct(c)}  {_short(name)}" for name, c in leaf.most_common(top)]
    return "\n".join(out)


def _short(text: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in text:
            text = text.replace(text[: text.index(marker) + len(marker)], "")
    return text


# --------------------------------------------------------------------------- driver


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = math.nan
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@contextlib.contextmanager
def _services() -> Iterator[list[Service]]:
    started: list[Service] = []
    try:
        yield started
    finally:
        for svc in reversed(started):
            svc.stop()


async def _run_db(
    db: str,
    database_url: str,
    args: argparse.Namespace,
    plan: Plan,
    sim: Service,
    sim_port: int,
    workdir: Path,
    log: Callable[[str], None],
) -> list[Row]:
    if db == "postgres":
        await reset_postgres(database_url, force=args.pg_force)
    port = free_port()
    proxy, api_key = start_proxy(port, sim_port, database_url, args.poll_interval, workdir, db)
    rows: list[Row] = []
    direct = Target("direct", f"http://{HOST}:{sim_port}", args.poll_interval)
    via = Target("proxy", f"http://{HOST}:{port}", args.poll_interval)
    via.bearer = api_key
    watch = {"simulator": sim.pid, "proxy": proxy.pid}
    try:
        for mode in plan.modes:
            for conc in plan.concurrencies:
                log(f"[{db}] {mode} c={conc}: direct ...")
                d = await measure(direct, mode, conc, plan, watch)
                log(f"[{db}] {mode} c={conc}: proxy ...")
                profile = None
                if args.profile:
                    out = args.profile / f"proxy-{db}-{mode}-c{conc}.txt"
                    profile = functools.partial(Profiler, proxy.pid, out, args.profile_rate)
                p = await measure(via, mode, conc, plan, watch, profile)
                for label, _ in SERIES[mode]:
                    row = Row(db, label, conc, d[label], p[label])
                    rows.append(row)
                    log("  " + " | ".join(row.cells()))
    finally:
        await direct.close()
        await via.close()
        proxy.stop()
    return rows


async def run(args: argparse.Namespace) -> list[Row]:
    plan = Plan(
        modes=args.modes,
        concurrencies=args.concurrency,
        requests=args.requests,
        serial_requests=args.serial_requests,
        warmup=args.warmup,
        op_timeout_s=args.op_timeout,
        cell_timeout_s=args.cell_timeout,
        ramp_s=args.ramp,
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # SIGTERM (timeout, kill) cancels the run like Ctrl-C does: the finally blocks
    # below stop the simulator and the proxy.
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    if args.wait_quiet > 0 and not wait_quiet(args.wait_quiet, log):
        log(f"warning: the machine was still busy after {args.wait_quiet:.0f}s; measuring anyway")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="flux-bench-") as tmp, _services() as started:
        workdir = Path(tmp)
        sim_port = free_port()
        sim = start_simulator(sim_port, args.job_latency, workdir)
        started.append(sim)
        for db in args.db:
            url = (f"sqlite+aiosqlite:///{workdir / 'proxy.db'}" if db == "sqlite"
                   else args.pg_url)
            rows += await _run_db(db, url, args, plan, sim, sim_port, workdir, log)
            if db == "sqlite":
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        (workdir / f"proxy.db{suffix}").unlink()
        if args.keep_logs:
            _copy_logs(workdir, args.keep_logs)
    return rows


def _copy_logs(workdir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in workdir.glob("*.log"):
        shutil.copy(f, dest / f.name)


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x.strip()) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/overhead.py",
        description="Latency the proxy adds in front of a WaveSpeed simulator.",
    )
    ap.add_argument("--requests", type=int, default=2000,
                    help="operations per measured cell at concurrency > 1 (default 2000)")
    ap.add_argument("--serial-requests", type=int, default=200,
                    help="operations per measured cell at concurrency 1 (default 200)")
    ap.add_argument("--warmup", type=int, default=50,
                    help="warm-up operations before each cell (at least the concurrency; "
                    "0: none)")
    ap.add_argument("--concurrency", type=_csv(int), default=[1, 200],
                    help="comma-separated (default 1,200)")
    ap.add_argument("--modes", type=_csv(str), default=["sync", "poll"],
                    help="comma-separated: sync, poll (default both)")
    ap.add_argument("--db", type=_csv(str), default=["sqlite"],
                    help="comma-separated: sqlite, postgres (default sqlite)")
    ap.add_argument("--pg-url", default=DEFAULT_PG_URL,
                    help="PostgreSQL for --db postgres; its tables are dropped first")
    ap.add_argument("--pg-force", action="store_true",
                    help="allow a --pg-url database not named flux_bench*")
    ap.add_argument("--job-latency", type=float, default=0.05,
                    help="simulator job latency in seconds (default 0.05)")
    ap.add_argument("--poll-interval", type=float, default=0.02,
                    help="client and proxy->simulator poll interval, s (default 0.02)")
    ap.add_argument("--ramp", type=float, default=0.0, metavar="S",
                    help="spread the workers' first requests over S seconds (for long "
                    "--job-latency: otherwise all 200 arrive in synchronized waves)")
    ap.add_argument("--op-timeout", type=float, default=60.0,
                    help="seconds one operation may take before it counts as an error")
    ap.add_argument("--cell-timeout", type=float, default=180.0,
                    help="no new operation starts in a cell after this many seconds")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 30 s): 10 serial / 200 concurrent operations per "
                    "cell, no warm-up; its figures are not measurements")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="first wait up to S seconds for other processes to leave the CPUs "
                    "idle (shared machines)")
    ap.add_argument("--json", type=Path, help="write every figure (and the machine) here")
    ap.add_argument("--profile", type=Path,
                    help="attach `py-spy record` to the proxy for each measured proxy window "
                    "and write raw stacks and a summary per cell into this folder (py-spy "
                    "slows the proxy: do not quote timings from a profiled run)")
    ap.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    ap.add_argument("--keep-logs", type=Path, help="copy the simulator/proxy logs here")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 200)
        args.serial_requests = min(args.serial_requests, 10)
        args.warmup = 0
        args.cell_timeout = min(args.cell_timeout, 20.0)
    bad = [m for m in args.modes if m not in SERIES] + [
        d for d in args.db if d not in ("sqlite", "postgres")]
    if bad:
        ap.error(f"unknown mode/db: {', '.join(bad)}")
    if any(c < 1 for c in args.concurrency) or args.requests < 1 or args.serial_requests < 1:
        ap.error("concurrency and request counts must be >= 1")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    started = time.time()
    runner_kw: dict[str, Any] = {}
    try:
        import uvloop

        runner_kw["loop_factory"] = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(**runner_kw) as runner:
        try:
            rows = runner.run(run(args))
        except (asyncio.CancelledError, KeyboardInterrupt):
            print("interrupted; the simulator and the proxy were stopped", file=sys.stderr)
            return 130
    elapsed = time.time() - started
    print(f"\nmachine: {info['nproc']} cores, {info['cpu']}, {info['mem_gib']} GiB, "
          f"Python {info['python']}")
    print(f"simulator job latency {args.job_latency * 1000:.0f} ms, poll interval "
          f"{args.poll_interval * 1000:.0f} ms, run took {elapsed:.0f} s; latencies in ms, "
          "added = proxy - direct percentile\n")
    print(render_table(rows))
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info,
            "argv": sys.argv,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "elapsed_s": round(elapsed, 1),
            "rows": [{"db": r.db, "mode": r.mode, "concurrency": r.concurrency,
                      "direct": r.direct.summary(), "proxy": r.proxy.summary()} for r in rows],
        }, indent=2))
    errors = sum(r.direct.errors + r.proxy.errors for r in rows)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
