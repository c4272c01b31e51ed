"""What the proxy adds: flux-proxy in front of a WaveSpeed simulator vs the simulator alone.

Three processes on 127.0.0.1 (the machine this was written for has 2 cores):

* a WaveSpeed simulator (`flux-proxy simulate wavespeed`) with a fixed job latency;
* the proxy (`flux-proxy serve`), configured by a temporary TOML file, routing only to
  that simulator, on a fresh SQLite file (or a dedicated PostgreSQL database);
* this process, the load generator: httpx.AsyncClient, one connection per worker.

Two modes, each at concurrency 1 and 200 (closed loop: every worker sends its next
request when the previous one ends):

* ``sync``: one POST with ``enable_sync_mode: true``. Direct: the simulator's own sync
  mode; via the proxy: the proxy's sync mode, emulated by polling WaveSpeed every
  ``--poll-interval`` (WaveSpeed is asynchronous by default; ``bench/compare.py
  --native-sync`` measures its native sync mode).
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
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run by path: this checkout's bench/, not one on PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness.cpu import OTHER_LOAD_WARN, CpuUsage, CpuWindow, machine_info, wait_quiet
from bench.harness.load import closed_loop
from bench.harness.procs import (
    HOST,
    cancel_on_sigterm,
    copy_logs,
    event_loop_runner,
    free_port,
    services,
)
from bench.harness.profile import Profiler
from bench.harness.proxy import (
    add_postgres_args,
    cli_client_key,
    proxy_config,
    reset_postgres,
    start_proxy,
)
from bench.harness.report import csv_list, load_notes, ms, percentile, render_table, write_json
from bench.harness.simulators import Simulator, start_simulator
from bench.overhead_ops import SERIES, Target

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/flux_bench"


# --------------------------------------------------------------------------- results


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
            "n": self.n, "errors": self.errors, "error_kinds": self.error_kinds,
            "wall_s": round(self.wall_s, 4), "rps": round(self.rps, 2),
            **{f"{k}_ms": round(self.p(q) * 1000, 3)
               for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "mean_ms": round(sum(self.latencies_s) / self.n * 1000, 3) if self.n else None,
            "proxy_cpu_s": self.proxy_cpu_s, "sim_cpu_s": self.sim_cpu_s,
            "client_cpu_s": self.client_cpu_s, "other_cpu_s": self.other_cpu_s,
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
        cpu = "-"  # per prediction: on the e2e rows only (the POST/GET rows share it)
        if p.proxy_cpu_s is not None and p.n and self.mode in ("sync", "poll e2e"):
            cpu = f"{p.proxy_cpu_s / p.n * 1000:.2f}"
        return [
            self.db, self.mode, str(self.concurrency), f"{d.n}/{p.n}",
            ms(d.p(50)), ms(d.p(99)), ms(p.p(50)), ms(p.p(99)),
            ms(p.p(50) - d.p(50)), ms(p.p(99) - d.p(99)),
            f"{d.rps:.0f}", f"{p.rps:.0f}", cpu,
            f"{d.errors}/{p.errors}" + (" (cut)" if d.truncated or p.truncated else ""),
        ]


HEADERS = ["db", "mode", "conc", "n d/p", "direct p50", "direct p99", "proxy p50",
           "proxy p99", "added p50", "added p99", "rps direct", "rps proxy",
           "proxy CPU ms/pred", "errors d/p"]


def render(rows: Sequence[Row]) -> str:
    """A Markdown table (latencies in ms), then a note per row measured on a busy machine."""
    notes = load_notes((f"{r.db} {r.mode} c={r.concurrency}", r.other_load()) for r in rows)
    return "\n".join([render_table(HEADERS, [r.cells() for r in rows]), *notes])


# --------------------------------------------------------------------------- one cell


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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    # Warm-up opens every worker's connection (at least `concurrency` operations);
    # --warmup 0 skips it (the smoke run).
    warm = min(max(plan.warmup, concurrency), plan.n_for(concurrency)) if plan.warmup else 0
    # Fresh connections per cell: ones idle since an earlier cell may be closed by the
    # server's keep-alive timeout just as they are reused (a spurious ReadError).
    await target.close()
    target.open(concurrency, plan.op_timeout_s)
    profiler: Profiler | None = None
    window: CpuWindow | None = None

    def on_measure() -> None:
        nonlocal profiler, window
        if profile is not None:
            profiler = profile()
        window = CpuWindow(watch)

    try:
        done = await closed_loop(target.op(mode), target.clients[:concurrency],
                                 plan.n_for(concurrency), warmup=warm, on_measure=on_measure,
                                 op_timeout_s=plan.op_timeout_s, window_s=plan.cell_timeout_s,
                                 ramp_s=plan.ramp_s)
    finally:
        summary = profiler.stop() if profiler is not None else None
    # None: the cell ran out of time during the warm-up, nothing was measured.
    cpu = window.stop() if window is not None else CpuUsage(0.0, dict.fromkeys(watch, 0.0),
                                                            0.0, 0.0)
    if summary:
        log(summary)
    what = f"{target.name} {mode} c={concurrency}"
    if done.wall_s > 0 and cpu.other_s / done.wall_s > OTHER_LOAD_WARN:
        log(f"  warning: {what}: other processes used {cpu.other_s / done.wall_s:.0%} of a "
            "core meanwhile")
    if done.error_kinds:
        log(f"  {what} errors: {done.error_kinds}")
    samples: dict[str, list[float]] = collections.defaultdict(list)
    for got in done.results:
        for key, values in got.items():
            samples[key] += values
    return {label: Series(
        latencies_s=samples.get(key, []), errors=done.errors, error_kinds=done.error_kinds,
        wall_s=done.wall_s, proxy_cpu_s=cpu.trees.get("proxy") if target.name == "proxy"
        else None, sim_cpu_s=cpu.trees.get("simulator"), client_cpu_s=cpu.own_s,
        other_cpu_s=None if math.isnan(cpu.other_s) else cpu.other_s,
        truncated=done.truncated) for label, key in SERIES[mode]}


# --------------------------------------------------------------------------- driver


async def _run_db(db: str, database_url: str, args: argparse.Namespace, plan: Plan,
                  sim: Simulator, workdir: Path) -> list[Row]:
    if db == "postgres":
        await reset_postgres(database_url, force=args.pg_force)
    port = free_port()
    # The proxy polls the simulator at the client's fixed interval (no backoff), so that
    # "poll e2e" compares like with like.
    config = proxy_config(port, database_url, instance_id="bench", order=["wavespeed"],
                          providers={"wavespeed": {
                              "base_url": sim.url, "poll_initial_s": args.poll_interval,
                              "poll_multiplier": 1.0, "poll_max_s": args.poll_interval,
                              "read_timeout_s": 60.0, "max_connections": 400},
                              "vibedream": {"enabled": False}})
    proxy, env = start_proxy(workdir, db, config)
    rows: list[Row] = []
    direct = Target("direct", sim.url, args.poll_interval)
    via = Target("proxy", f"http://{HOST}:{port}", args.poll_interval)
    watch = {"simulator": sim.pid, "proxy": proxy.pid}
    try:
        via.bearer = cli_client_key(env, f"bench-{os.getpid()}-{port}")
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
    plan = Plan(modes=args.modes, concurrencies=args.concurrency, requests=args.requests,
                serial_requests=args.serial_requests, warmup=args.warmup,
                op_timeout_s=args.op_timeout, cell_timeout_s=args.cell_timeout,
                ramp_s=args.ramp)
    cancel_on_sigterm()  # the finally blocks below stop the simulator and the proxy
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet, log)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="flux-bench-") as tmp, services() as started:
        workdir = Path(tmp)
        sim = start_simulator("wavespeed", args.job_latency, workdir, name="simulator")
        started.append(sim)
        for db in args.db:
            url = (f"sqlite+aiosqlite:///{workdir / 'proxy.db'}" if db == "sqlite"
                   else args.pg_url)
            rows += await _run_db(db, url, args, plan, sim, workdir)
            if db == "sqlite":
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        (workdir / f"proxy.db{suffix}").unlink()
        if args.keep_logs:
            copy_logs(workdir, args.keep_logs)
    return rows


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
    ap.add_argument("--concurrency", type=csv_list(int), default=[1, 200],
                    help="comma-separated (default 1,200)")
    ap.add_argument("--modes", type=csv_list(str), default=["sync", "poll"],
                    help="comma-separated: sync, poll (default both)")
    ap.add_argument("--db", type=csv_list(str), default=["sqlite"],
                    help="comma-separated: sqlite, postgres (default sqlite)")
    add_postgres_args(ap, DEFAULT_PG_URL)
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
    with event_loop_runner() as runner:
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
    print(render(rows))
    if args.json:
        write_json(args.json, {
            "machine": info, "argv": sys.argv, "args": vars(args),
            "elapsed_s": round(elapsed, 1),
            "rows": [{"db": r.db, "mode": r.mode, "concurrency": r.concurrency,
                      "direct": r.direct.summary(), "proxy": r.proxy.summary()} for r in rows],
        })
    errors = sum(r.direct.errors + r.proxy.errors for r in rows)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
