"""What failover costs: one provider failing 10% / 50% / 100% of requests, another healthy.

Processes on 127.0.0.1 (the machine this was written for has 2 cores):

* the primary, a WaveSpeed simulator: `flux-proxy simulate wavespeed` for the
  ``submit-5xx`` table (its ``error_rate`` knob: that fraction of submits is answered
  HTTP 500); for the ``after-accept`` table, the same simulator app served by
  ``python -m bench.failover simulator``, where ``error_rate`` instead means "that
  fraction of *accepted* jobs then fail" (WaveSpeed ``data.code`` 5000). The simulator has
  that fault only as all-or-nothing (``fail_after_accept``) or per request (a
  ``[sim:fail-after-accept]`` prompt directive, which the proxy would forward to the
  secondary too), hence the wrapper;
* the secondary, a healthy VibeDream simulator (`flux-proxy simulate vibedream`);
* the proxy (`flux-proxy serve`), a fresh process and SQLite file per cell (breaker state
  and metrics are per process), ``routing.order = ["wavespeed", "vibedream"]``;
* this process, the load generator: sync-mode ``POST /v1/predictions`` (with a client
  key made per cell through ``POST /admin/keys``: auth stays on, as in production) from
  ``--concurrency`` workers (closed loop, one connection each), ``size`` 512*512 (one
  both providers take).

The primary serves sync requests with WaveSpeed's native sync mode (one upstream call);
the secondary is polled (``poll_initial_s`` 0.05). So a failed-over request pays the
failed attempt, then the secondary's own latency, which differs from the primary's: the
``secondary only`` row (routing.order = ["vibedream"]) measures the latter alone.

Each cell: start the proxy, warm it up (``--warmup`` requests at 0% failure, half of them
pinned to the secondary), reset the simulators' counters and RNGs, set the primary's
``error_rate``, send ``--requests`` predictions, then read the simulators'
``GET /_sim/stats`` (upstream calls), the proxy's ``GET /metrics``
(``flux_proxy_failovers_total``) and ``GET /v1/models`` (breaker state per provider).
"breaker off" sets the breaker's thresholds out of reach, to show raw failover cost.
"added" is the cell's percentile minus the 0% baseline's (requests are not paired).

Two more tables: per cell, who served, calls per provider, throughput, the proxy's CPU
per prediction and the share of the CPUs used by processes not ours ("other load", from
/proc: on a shared machine, that is the noise); and the median of each phase of a
failed-over request, from the response's own timestamps (``created_at``,
``attempts[].created_at`` / ``completed_at``, ``completed_at``).

    .venv/bin/python -m bench.failover                 # the full run (1,000 per cell)
    .venv/bin/python -m bench.failover --quick         # smoke run (< 60 s)
    .venv/bin/python -m bench.failover --rates 0.5 --modes submit-5xx --breaker off
    .venv/bin/python -m bench.failover --wait-quiet 120   # on a shared machine

Every loop is bounded by a count and a time limit; the script always stops the
processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
SIM_KEY = "sim-key"
PRIMARY, SECONDARY = "wavespeed", "vibedream"
MODES = ("submit-5xx", "after-accept")
REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SYNC_TIMEOUT_S = 60.0
BREAKER_ON = {"failure_threshold": 5, "error_rate_threshold": 0.5, "window_s": 60.0,
              "min_calls": 20, "cooldown_s": 30.0}  # the proxy's defaults, written out
BREAKER_OFF = {"failure_threshold": 1_000_000_000, "error_rate_threshold": 1.0,
               "window_s": 60.0, "min_calls": 1_000_000_000, "cooldown_s": 30.0}
_FAILOVER_LINE = re.compile(r'^flux_proxy_failovers_total\{(?P<labels>[^}]*)\}\s+(?P<v>\S+)$')


# --------------------------------------------------------------------------- results


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class CellSpec:
    mode: str  # "baseline", "secondary-only", or one of MODES
    rate: float
    breaker: bool

    @property
    def label(self) -> str:
        if self.mode in MODES:
            return f"{self.mode} {self.rate:.0%} breaker {'on' if self.breaker else 'off'}"
        return self.mode


@dataclass
class Sample:
    latency_s: float
    ok: bool
    provider: str | None = None
    attempts: int = 0
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # PHASES -> seconds


# Where one prediction's time went, from the response's own timestamps (the first and
# last attempt; with two attempts, "first attempt" is the failed one):
PHASES = {
    "before": "created -> first attempt row",
    "first": "first attempt (row written -> outcome recorded)",
    "between": "first attempt recorded -> next attempt row",
    "last": "last attempt (the one that served it)",
    "after": "last attempt recorded -> prediction completed",
    "outside": "client latency minus created -> completed (HTTP, parse, insert, answer)",
}


def _when(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    with contextlib.suppress(ValueError):
        return datetime.datetime.fromisoformat(value)
    return None


def phases(data: dict[str, Any], latency_s: float) -> dict[str, float]:
    """Seconds per PHASES key ({} when a timestamp is missing)."""
    attempts = [a for a in data.get("attempts") or [] if isinstance(a, dict)]
    created, completed = _when(data.get("created_at")), _when(data.get("completed_at"))
    if not attempts or created is None or completed is None:
        return {}
    first, last = attempts[0], attempts[-1]
    marks = [_when(first.get("created_at")), _when(first.get("completed_at")),
             _when(last.get("created_at")), _when(last.get("completed_at"))]
    if any(m is None for m in marks):
        return {}
    f0, f1, l0, l1 = (m for m in marks if m is not None)
    out = {"before": f0 - created, "after": completed - l1, "last": l1 - l0}
    if len(attempts) > 1:
        out |= {"first": f1 - f0, "between": l0 - f1}
    result = {k: v.total_seconds() for k, v in out.items()}
    result["outside"] = latency_s - (completed - created).total_seconds()
    return result


@dataclass
class CellResult:
    spec: CellSpec
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    truncated: bool = False
    sim_stats: dict[str, dict[str, int]] = field(default_factory=dict)
    failovers: dict[str, float] = field(default_factory=dict)  # reason -> count
    health: dict[str, dict[str, Any]] = field(default_factory=dict)
    proxy_cpu_s: float | None = None  # the proxy's CPU over the measured window
    other_load: float | None = None  # CPU used by processes not ours, share of all CPUs

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def failures(self) -> int:
        return sum(1 for s in self.samples if not s.ok)

    def latencies(self, *, failed_over: bool | None = None) -> list[float]:
        return [s.latency_s for s in self.samples
                if s.ok and (failed_over is None or (s.attempts > 1) == failed_over)]

    def p(self, q: float, **kw: Any) -> float:
        return percentile(self.latencies(**kw), q)

    def phase(self, name: str, q: float = 50, *, failed_over: bool = True) -> float:
        return percentile([s.phases[name] for s in self.samples
                           if s.ok and (s.attempts > 1) == failed_over and name in s.phases], q)

    def calls(self, provider: str | None = None) -> int:
        names = [provider] if provider else list(self.sim_stats)
        return sum(self.sim_stats.get(n, {}).get("submits", 0)
                   + self.sim_stats.get(n, {}).get("polls", 0) for n in names)

    def breaker(self, provider: str) -> str:
        return str(self.health.get(provider, {}).get("state", "?"))

    def summary(self) -> dict[str, Any]:
        served = Counter(s.provider for s in self.samples if s.ok)
        errors = Counter(s.error for s in self.samples if not s.ok)
        return {
            **asdict(self.spec), "n": self.n, "client_failures": self.failures,
            "errors": dict(errors), "served_by": dict(served),
            "failed_over": len(self.latencies(failed_over=True)),
            "p50_ms": _ms(self.p(50)), "p99_ms": _ms(self.p(99)),
            "failed_over_p50_ms": _ms(self.p(50, failed_over=True)),
            "failed_over_p99_ms": _ms(self.p(99, failed_over=True)),
            "phases_p50_ms": {
                group: {k: _ms(self.phase(k, failed_over=fo)) for k in PHASES}
                for group, fo in (("failed_over", True), ("first_attempt_served", False))},
            "wall_s": round(self.wall_s, 3), "truncated": self.truncated,
            "proxy_cpu_s": self.proxy_cpu_s, "other_load": self.other_load,
            "sim_stats": self.sim_stats, "failovers": self.failovers, "health": self.health,
        }


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 1)


def _fmt(seconds: float, *, signed: bool = False) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:+.0f}" if signed else f"{seconds * 1000:.0f}"


MAIN_HEADERS = ["failure", "rate", "breaker", "n", "client failures", "p50 ms", "p99 ms",
                "added p50", "added p99", "upstream calls/pred", "failovers",
                f"breaker {PRIMARY}/{SECONDARY}"]
DETAIL_HEADERS = ["failure", "rate", "breaker", f"served {PRIMARY}/{SECONDARY}",
                  "failed over", "failed-over p50", "failed-over p99",
                  f"{PRIMARY} calls", f"{SECONDARY} submits+polls", "wall s", "pred/s",
                  "proxy CPU ms/pred", "other load"]


def main_cells(r: CellResult, base: CellResult | None) -> list[str]:
    s = r.spec
    def added(q: float) -> str:
        return "-" if base is None or s.mode == "baseline" else _fmt(r.p(q) - base.p(q),
                                                                     signed=True)
    return [
        s.mode, f"{s.rate:.0%}" if s.mode in MODES else "0%",
        ("on" if s.breaker else "off") if s.mode in MODES else "-",
        str(r.n) + (" (cut)" if r.truncated else ""), str(r.failures),
        _fmt(r.p(50)), _fmt(r.p(99)), added(50), added(99),
        f"{r.calls() / r.n:.2f}" if r.n else "-",
        f"{sum(r.failovers.values()):.0f}",
        f"{r.breaker(PRIMARY)}/{r.breaker(SECONDARY)}",
    ]


def detail_cells(r: CellResult) -> list[str]:
    s = r.spec
    served = Counter(x.provider for x in r.samples if x.ok)
    vd = r.sim_stats.get(SECONDARY, {})
    return [
        s.mode, f"{s.rate:.0%}" if s.mode in MODES else "0%",
        ("on" if s.breaker else "off") if s.mode in MODES else "-",
        f"{served.get(PRIMARY, 0)}/{served.get(SECONDARY, 0)}",
        str(len(r.latencies(failed_over=True))),
        _fmt(r.p(50, failed_over=True)), _fmt(r.p(99, failed_over=True)),
        str(r.calls(PRIMARY)), f"{vd.get('submits', 0)}+{vd.get('polls', 0)}",
        f"{r.wall_s:.1f}", f"{r.n / r.wall_s:.0f}" if r.wall_s > 0 else "-",
        f"{r.proxy_cpu_s / r.n * 1000:.1f}" if r.proxy_cpu_s is not None and r.n else "-",
        f"{r.other_load:.0%}" if r.other_load is not None else "-",
    ]


PHASE_HEADERS = ["failure", "rate", "breaker", "requests", *PHASES, "sum of medians", "client p50"]


def phase_rows(r: CellResult) -> list[list[str]]:
    """Median of each phase: failed-over requests, and (baseline / secondary-only)
    requests served by their first attempt."""
    s = r.spec
    rows = []
    for failed_over in ((False,) if s.mode not in MODES else (True,)):
        n = len(r.latencies(failed_over=failed_over))
        if not n:
            continue
        medians = [r.phase(k, failed_over=failed_over) for k in PHASES]
        total = sum(m for m in medians if not math.isnan(m))
        rows.append([
            s.mode, f"{s.rate:.0%}" if s.mode in MODES else "0%",
            ("on" if s.breaker else "off") if s.mode in MODES else "-",
            f"{n} {'failed over' if failed_over else 'first attempt'}",
            *(_fmt(m) for m in medians), _fmt(total),
            _fmt(r.p(50, failed_over=failed_over)),
        ])
    return rows


def render(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = [headers, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([fmt(headers), rule, *(fmt(row) for row in rows)])


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The environment minus anything that would configure the proxy behind our back."""
    prefixes = ("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_", "LOCAL_WORKER")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _cli() -> list[str]:
    """How to run `flux-proxy`: the console script beside this interpreter, if any."""
    script = Path(sys.executable).with_name("flux-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]


def _tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc; just pid elsewhere)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 64:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError, ValueError):
            children = Path(f"/proc/{current}/task/{current}/children").read_text()
            todo += [int(c) for c in children.split()]
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process tree (None without /proc)."""
    total, seen = 0, False
    for p in _tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
        seen = True
    return total / os.sysconf("SC_CLK_TCK") if seen else None


def busy_seconds() -> float | None:
    """CPU time the whole machine spent not idle, summed over CPUs (None without /proc)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # guest time is already in user
    return busy / os.sysconf("SC_CLK_TCK")


class CpuWindow:
    """The proxy's CPU, and the CPU of processes not ours, over one measured window."""

    def __init__(self, proxy: int, ours: Sequence[int]) -> None:
        self.proxy, self.ours = proxy, [proxy, *ours, os.getpid()]
        self.start = self._read()

    def _read(self) -> tuple[float | None, float | None, float | None]:
        ours = [cpu_seconds(p) for p in self.ours]
        total = None if None in ours else sum(c for c in ours if c is not None)
        return cpu_seconds(self.proxy), total, busy_seconds()

    def stop(self, wall_s: float) -> tuple[float | None, float | None]:
        def delta(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        (p0, o0, b0), (p1, o1, b1) = self.start, self._read()
        ours, busy = delta(o0, o1), delta(b0, b1)
        other = None
        if ours is not None and busy is not None and wall_s > 0:
            other = max(0.0, busy - ours) / (wall_s * (os.cpu_count() or 1))
        return delta(p0, p1), other


def wait_quiet(ours: Sequence[int], max_s: float, threshold: float = 0.15,
               quiet_s: int = 3) -> float:
    """Wait (at most `max_s`) until processes not ours have used under `threshold` of
    the CPUs for `quiet_s` one-second windows in a row; the seconds waited."""
    t0 = time.monotonic()
    quiet = 0
    while quiet < quiet_s and time.monotonic() - t0 < max_s:
        window = CpuWindow(ours[0], ours[1:])
        time.sleep(1.0)
        _, other = window.stop(1.0)
        if other is None:
            return 0.0
        quiet = quiet + 1 if other < threshold else 0
    return time.monotonic() - t0


class Service:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(argv, env=env or _clean_env(), cwd=REPO, stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)

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
        """SIGINT to the group, SIGKILL if it is still there after STOP_TIMEOUT_S."""
        if self.proc.poll() is None:
            for sig in (signal.SIGINT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._fh.close()


class Simulator(Service):
    def __init__(self, name: str, argv: list[str], port: int, workdir: Path) -> None:
        super().__init__(name, argv, workdir / f"{name}.log")
        self.url = f"http://{HOST}:{port}"

    def control(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if body is None:
            r = httpx.get(self.url + path, timeout=5.0)
        else:
            r = httpx.post(self.url + path, json=body, timeout=5.0)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data


def start_simulator(kind: str, job_latency_s: float, workdir: Path, *,
                    after_accept: bool = False) -> Simulator:
    port = free_port()
    common = ["--host", HOST, "--port", str(port), "--job-latency", str(job_latency_s)]
    if after_accept:
        argv = [sys.executable, "-m", "bench.failover", "simulator", kind, *common]
        name = f"{kind}-after-accept"
    else:
        argv = [*_cli(), "simulate", kind, *common, "--api-key", SIM_KEY]
        name = kind
    sim = Simulator(name, argv, port, workdir)
    return sim


def proxy_toml(port: int, db: Path, primary_url: str, secondary_url: str, *,
               breaker: bool, order: Sequence[str]) -> str:
    knobs = BREAKER_ON if breaker else BREAKER_OFF
    table = "\n".join(f"{k} = {v!r}" for k, v in knobs.items())
    routing = ", ".join(f'"{name}"' for name in order)

    def provider(name: str, url: str) -> str:
        return (f'[providers.{name}]\nbase_url = "{url}"\napi_key = "{SIM_KEY}"\n'
                'poll_initial_s = 0.05\nmax_connections = 100\n')

    return (
        f'host = "{HOST}"\nport = {port}\ndatabase_url = "sqlite+aiosqlite:///{db}"\n'
        f'log_level = "warning"\ninstance_id = "bench-failover"\n'
        f"sync_timeout_s = {SYNC_TIMEOUT_S}\n\n"
        f"[routing]\norder = [{routing}]\n\n[routing.breaker]\n{table}\n\n"
        + provider(PRIMARY, primary_url) + "\n" + provider(SECONDARY, secondary_url)
    )


# --------------------------------------------------------------------------- load


def _body(i: int, pin: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": f"a lighthouse at dusk, oil painting #{i}",
                            "size": "512*512", "seed": i, "enable_sync_mode": True}
    if pin:
        body["providers"] = [pin]
    return body


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/predictions", json=body)
    except httpx.HTTPError as exc:
        return Sample(time.perf_counter() - t0, False, error=type(exc).__name__)
    elapsed = time.perf_counter() - t0
    try:
        data = r.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return Sample(elapsed, False, error=f"HTTP {r.status_code} (not a JSON object)")
    attempts = data.get("attempts") if isinstance(data.get("attempts"), list) else []
    ok = r.status_code == 200 and data.get("status") == "completed"
    error = None if ok else (
        f"HTTP {r.status_code} {data.get('status')} {data.get('error_kind')}")
    return Sample(elapsed, ok, data.get("provider"), len(attempts or []), error,
                  phases(data, elapsed) if ok else {})


async def load(base_url: str, n: int, concurrency: int, request_timeout_s: float,
               time_limit_s: float, *, headers: dict[str, str] | None = None,
               pin_every: int = 0, offset: int = 0) -> tuple[list[Sample], float, bool]:
    """`n` sync predictions from `concurrency` closed-loop workers. No new request starts
    after `time_limit_s`; returns (samples, wall seconds, cut short)."""
    clients = [httpx.AsyncClient(base_url=base_url, timeout=request_timeout_s, headers=headers,
                                 limits=httpx.Limits(max_connections=1))
               for _ in range(max(1, min(concurrency, n)))]
    samples: list[Sample] = []
    issued = 0
    t0 = time.monotonic()
    stop_at = t0 + time_limit_s

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < n and time.monotonic() < stop_at:
            i = issued
            issued += 1
            pin = SECONDARY if pin_every and i % pin_every == 1 else None
            samples.append(await _one(client, _body(offset + i, pin)))

    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        for client in clients:
            await client.aclose()
    return samples, time.monotonic() - t0, issued < n


def _failovers(metrics_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        m = _FAILOVER_LINE.match(line.strip())
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
            key = f"{labels.get('from')}->{labels.get('to')} {labels.get('reason')}"
            out[key] = out.get(key, 0.0) + float(m.group("v"))
    return out


def client_key(url: str, admin_key: str) -> dict[str, str]:
    """Headers for /v1: a client key made with the admin key (none where the proxy has
    no /admin/keys, i.e. predates client keys)."""
    r = httpx.post(url + "/admin/keys", json={"name": "bench-failover"}, timeout=10,
                   headers={"Authorization": f"Bearer {admin_key}"})
    if r.status_code == 404:
        return {}
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['key']}"}


def _health(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    data = models.get("data") or [{}]
    return {p["name"]: p.get("health") or {} for p in data[0].get("providers", [])}


# --------------------------------------------------------------------------- one cell


@dataclass
class Options:
    requests: int
    concurrency: int
    warmup: int
    job_latency_s: float
    request_timeout_s: float
    cell_time_limit_s: float
    wait_quiet_s: float = 0.0


def run_cell(spec: CellSpec, sims: dict[str, Simulator], opts: Options,
             workdir: Path) -> CellResult:
    primary = sims["after-accept" if spec.mode == "after-accept" else PRIMARY]
    secondary = sims[SECONDARY]
    tag = re.sub(r"[^a-z0-9]+", "-", spec.label.lower()).strip("-")
    port = free_port()
    config = workdir / f"proxy-{tag}.toml"
    order = [SECONDARY] if spec.mode == "secondary-only" else [PRIMARY, SECONDARY]
    config.write_text(proxy_toml(port, workdir / f"proxy-{tag}.db", primary.url,
                                 secondary.url, breaker=spec.breaker, order=order))
    admin_key = secrets.token_urlsafe(24)
    env = _clean_env() | {"FLUX_PROXY_CONFIG": str(config), "FLUX_PROXY_ADMIN_KEY": admin_key}
    proxy = Service(f"proxy[{tag}]", [*_cli(), "serve"], workdir / f"proxy-{tag}.log", env)
    url = f"http://{HOST}:{port}"
    result = CellResult(spec)
    try:
        proxy.wait_ready(url + "/readyz")
        headers = client_key(url, admin_key)  # auth stays on, as in production
        for sim in (primary, secondary):  # creation config: error_rate 0
            sim.control("/_sim/reset", {})
        if opts.warmup:
            # Half pinned to the secondary, so its connection pool is warm too.
            warm, _, _ = asyncio.run(load(url, opts.warmup, opts.concurrency,
                                          opts.request_timeout_s, opts.cell_time_limit_s,
                                          headers=headers,
                                          pin_every=2 if len(order) > 1 else 0,
                                          offset=10_000_000))
            bad = [s.error for s in warm if not s.ok]
            if bad:
                raise RuntimeError(f"warm-up failed at 0% failure: {Counter(bad)}")
        if opts.wait_quiet_s > 0:
            waited = wait_quiet([proxy.proc.pid, *(sim.proc.pid for sim in sims.values())],
                                opts.wait_quiet_s)
            if waited > 5:
                print(f"  (waited {waited:.0f} s for other processes to quieten)",
                      file=sys.stderr, flush=True)
        for sim in (primary, secondary):
            sim.control("/_sim/reset", {})  # counters, jobs and fault RNG
        before = _failovers(httpx.get(url + "/metrics", timeout=10).text)
        if spec.mode in MODES:
            primary.control("/_sim/config", {"error_rate": spec.rate})
        window = CpuWindow(proxy.proc.pid, [sim.proc.pid for sim in sims.values()])
        result.samples, result.wall_s, result.truncated = asyncio.run(
            load(url, opts.requests, opts.concurrency, opts.request_timeout_s,
                 opts.cell_time_limit_s, headers=headers))
        result.proxy_cpu_s, result.other_load = window.stop(result.wall_s)
        models = httpx.get(url + "/v1/models", headers=headers, timeout=10)
        models.raise_for_status()
        result.health = _health(models.json())
        after = _failovers(httpx.get(url + "/metrics", timeout=10).text)
        result.failovers = {k: v - before.get(k, 0.0) for k, v in after.items()
                            if v - before.get(k, 0.0)}
        result.sim_stats = {PRIMARY: primary.control("/_sim/stats"),
                            SECONDARY: secondary.control("/_sim/stats")}
    finally:
        proxy.stop()
        with contextlib.suppress(httpx.HTTPError):
            primary.control("/_sim/reset", {})
    return result


# --------------------------------------------------------------------------- the run


def plan(args: argparse.Namespace) -> list[CellSpec]:
    cells = [CellSpec("baseline", 0.0, True)]
    if args.secondary_reference:
        cells.append(CellSpec("secondary-only", 0.0, True))
    for mode in args.modes:
        for breaker in args.breaker:
            cells += [CellSpec(mode, rate, breaker) for rate in args.rates]
    return cells


def machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def _csv(kind: type, allowed: Sequence[Any] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma list of {allowed}")
        return values
    return parse


def _on_off(text: str) -> list[bool]:
    return [v == "on" for v in _csv(str, ("on", "off"))(text)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="predictions per cell")
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=None, help="default: --concurrency")
    ap.add_argument("--rates", type=_csv(float), default=[0.1, 0.5, 1.0],
                    help="primary failure rates (comma list)")
    ap.add_argument("--modes", type=_csv(str, MODES), default=list(MODES))
    ap.add_argument("--breaker", type=_on_off, default=[True, False], help="on,off")
    ap.add_argument("--job-latency", type=float, default=0.1, help="simulated job seconds")
    ap.add_argument("--no-secondary-reference", dest="secondary_reference",
                    action="store_false", help="skip the secondary-only row")
    ap.add_argument("--request-timeout", type=float, default=SYNC_TIMEOUT_S + 30)
    ap.add_argument("--cell-time-limit", type=float, default=300.0,
                    help="no new request starts after this many seconds in a cell")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each cell, wait up to S seconds for processes not ours "
                    "to use < 15%% of the CPUs (shared machines)")
    ap.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
    ap.add_argument("--json", type=Path, default=None, help="write every cell's data here")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep configs, databases and logs here (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency = min(args.requests, 60), min(args.concurrency, 10)
        args.rates, args.breaker = [0.5, 1.0], [True, False]
        args.modes, args.secondary_reference = ["submit-5xx"], False
        args.cell_time_limit = min(args.cell_time_limit, 20.0)
    if args.warmup is None:
        args.warmup = args.concurrency
    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.concurrency <= 1000:
        ap.error("--requests 1..1000000, --concurrency 1..1000")
    if any(not 0 < r <= 1 for r in args.rates):
        ap.error("--rates are fractions in (0, 1]")
    return args


def run(args: argparse.Namespace, workdir: Path) -> list[CellResult]:
    opts = Options(args.requests, args.concurrency, args.warmup, args.job_latency,
                   args.request_timeout, args.cell_time_limit, args.wait_quiet)
    sims: dict[str, Simulator] = {}
    try:
        sims[PRIMARY] = start_simulator(PRIMARY, args.job_latency, workdir)
        sims[SECONDARY] = start_simulator(SECONDARY, args.job_latency, workdir)
        if "after-accept" in args.modes:
            sims["after-accept"] = start_simulator(PRIMARY, args.job_latency, workdir,
                                                   after_accept=True)
        for sim in sims.values():
            sim.wait_ready(sim.url + "/_sim/health")
        results: list[CellResult] = []
        for spec in plan(args):
            t0 = time.monotonic()
            result = run_cell(spec, sims, opts, workdir)
            results.append(result)
            print(f"  {spec.label}: n={result.n} failures={result.failures} "
                  f"p50={_fmt(result.p(50))} ms p99={_fmt(result.p(99))} ms "
                  f"({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
        return results
    finally:
        for sim in sims.values():
            sim.stop()


def report(results: list[CellResult]) -> str:
    base = next((r for r in results if r.spec.mode == "baseline"), None)
    main_rows = [main_cells(r, base) for r in results]
    detail_rows = [detail_cells(r) for r in results]
    errors = [f"- {r.spec.label}: {dict(Counter(s.error for s in r.samples if not s.ok))}"
              for r in results if r.failures]
    phase = [row for r in results for row in phase_rows(r)]
    out = [render(MAIN_HEADERS, main_rows), "", render(DETAIL_HEADERS, detail_rows), "",
           "Medians (ms) of where the time goes: "
           + "; ".join(f"{k}: {v}" for k, v in PHASES.items()), "",
           render(PHASE_HEADERS, phase)]
    if errors:
        out += ["", "client-visible failures:", *errors]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulator"]:
        return simulator_main(argv[1:])
    args = parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through every `finally`: children stop

    previous = signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    print(f"# {machine()}", file=sys.stderr)
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            results = run(args, args.workdir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
                results = run(args, Path(tmp))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report(results))
    print(f"\n{len(results)} cells, {time.monotonic() - started:.0f} s; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    if args.json is not None:
        args.json.write_text(json.dumps(
            {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
             "cells": [r.summary() for r in results]}, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------- simulator


def simulator_main(argv: Sequence[str]) -> int:
    """`python -m bench.failover simulator KIND --port N`: a simulator whose
    `error_rate` means "that fraction of accepted jobs then fail" instead of 5xx."""
    import uvicorn

    from providers.simulators import SimConfig, create_app
    from providers.simulators.faults import Faults
    from providers.simulators.jobs import Failure

    class AfterAcceptFaults(Faults):
        def submit_status(self, d: Any) -> int | None:
            if d.http_status is not None:
                return int(d.http_status)
            if self.chance(self.config.rate_limit) or not self.take_token():
                return 429
            return None  # error_rate is spent on accepted jobs instead

        def failure(self, d: Any) -> Failure | None:
            drawn = super().failure(d)
            if drawn is None and self.chance(self.config.error_rate):
                return Failure(self.config.fail_code)
            return drawn

    ap = argparse.ArgumentParser(prog="python -m bench.failover simulator")
    ap.add_argument("kind", choices=["wavespeed", "vibedream"])
    ap.add_argument("--host", default=HOST)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--job-latency", type=float, default=0.1)
    args = ap.parse_args(argv)
    app = create_app(args.kind, SimConfig(api_key=SIM_KEY, job_latency_s=args.job_latency))
    app.faults = AfterAcceptFaults(app.config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
