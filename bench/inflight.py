"""Predictions in flight on one proxy replica: open-loop arrivals into long upstream jobs.

Processes on 127.0.0.1: the WaveSpeed and/or VibeDream simulators, one proxy
(``flux-proxy serve``, SQLite in a temp dir or PostgreSQL), a /healthz prober (its own
process: a GET every ~50 ms) and this process, the load generator. Each step runs
arrivals at a fixed rate (``target / mean job``, Little's law) for the longest job
(settling) and then a measured window. Every prediction is async (``POST
/v1/predictions``, no sync mode) and asks the simulator for a job of a random duration
(uniform in ``--job-range``, via the ``[sim:latency=S]`` prompt directive); the client
checks each one once after it should have ended, then every 2 s, so the proxy carries
the in-flight work and the client adds about one GET per prediction.

Per step (the window): predictions in flight (the proxy's own gauge), its RSS, its CPU
per prediction (CPU seconds over the window / predictions arriving in it), upstream polls
per prediction (GETs the simulators counted / arrivals), /healthz p50/p99, POST p99, and
the end-to-end overhead of the window's predictions (the proxy's ``completed_at`` minus
when the client sent the POST minus the job's duration; known after the drain).

    .venv/bin/python -m bench.inflight --quick         # ~60 s: 100, then 500 in flight
    .venv/bin/python -m bench.inflight                 # 1k, 2.5k, 5k, 10k (~5 min)
    .venv/bin/python -m bench.inflight --db postgres --targets 2000,4000 --job-range 10,30

Bounded: every loop by count and time, the run by ``--max-time``; a step that overloads
the proxy (POST errors, shed arrivals, or late ones) ends the ramp unless ``--no-stop``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run by path: this checkout's bench/, not one on PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.harness.cpu import CpuUsage, CpuWindow, machine_info, wait_quiet
from bench.harness.litellm import tree_rss_bytes
from bench.harness.openloop import (
    PredictionLoad,
    Tracked,
    arrivals,
    metric_value,
    read_probes,
    rss_bytes,
    start_prober,
)
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
    bearer,
    cli_client_key,
    proxy_config,
    reset_postgres,
    start_proxy,
)
from bench.harness.report import csv_list, load_notes, percentile, render_table, write_json
from bench.harness.simulators import Simulator, start_simulator

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/flux_bench_inflight"
IN_FLIGHT = "flux_proxy_predictions_in_flight"
MiB = 1024 * 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Step:
    target: int
    rate: float
    w0: float = math.nan  # the measured window, monotonic
    w1: float = math.nan
    cpu: CpuUsage | None = None
    rss: int = 0
    peak_rss: int = 0
    polls: int = 0
    in_flight: list[float] = field(default_factory=list)  # the proxy's gauge, sampled
    probes: list[float] = field(default_factory=list)
    probe_failed: int = 0
    preds: list[Tracked] = field(default_factory=list)  # arrivals due in the window

    def figures(self) -> dict[str, Any]:
        p, cpu, wall = self.preds, self.cpu, self.w1 - self.w0
        n = len(p)
        over = [t.overhead_s for t in p if t.status == "completed" and not math.isnan(
            t.overhead_s)]
        posts = [t.post_s for t in p if not math.isnan(t.post_s)]
        now = time.monotonic()  # arrivals still waiting for a connection count as late
        lags = [t.lag_s if not math.isnan(t.sent) else now - t.due for t in p
                if not math.isnan(t.sent) or t.error is None]

        def core(name: str) -> float:
            return cpu.trees.get(name, math.nan) / wall if cpu else math.nan

        return {
            "target": self.target, "rate": self.rate, "window_s": round(wall, 2),
            "arrivals": n, "in_flight_mean": sum(self.in_flight) / len(self.in_flight)
            if self.in_flight else math.nan, "in_flight_max": max(self.in_flight, default=0),
            "rss_mib": self.rss / MiB, "peak_rss_mib": self.peak_rss / MiB,
            "proxy_cpu_ms_per_pred": cpu.trees["proxy"] / n * 1000 if cpu and n else math.nan,
            "proxy_cores": core("proxy"), "sim_cores": core("simulators"),
            "client_cores": cpu.own_s / wall if cpu else math.nan,
            "other_cores": cpu.other_cores() if cpu else math.nan,
            "polls_per_pred": self.polls / n if n else math.nan,
            "healthz_p50_ms": percentile(self.probes, 50) * 1000,
            "healthz_p99_ms": percentile(self.probes, 99) * 1000,
            "healthz_n": len(self.probes), "healthz_failed": self.probe_failed,
            "post_p50_ms": percentile(posts, 50) * 1000,
            "post_p99_ms": percentile(posts, 99) * 1000,
            "lag_p99_ms": percentile(lags, 99) * 1000,
            "overhead_p50_ms": percentile(over, 50) * 1000,
            "overhead_p99_ms": percentile(over, 99) * 1000,
            "completed": sum(t.status == "completed" for t in p),
            "failed": sum(t.status in ("failed", "canceled") for t in p),
            "errors": sum(t.error is not None for t in p),
        }


HEADERS = ["target", "rate/s", "in flight", "preds", "RSS MiB", "CPU ms/pred", "proxy cores",
           "polls/pred", "healthz p50/p99 ms", "POST p99 ms", "overhead p50/p99 ms",
           "lag p99 ms", "client cores", "sim cores", "ok/failed/err"]


def cells(f: dict[str, Any]) -> list[str]:
    def num(v: float, fmt: str = ".0f") -> str:
        return "-" if math.isnan(v) else format(v, fmt)

    return [str(f["target"]), num(f["rate"], ".1f"), num(f["in_flight_mean"]),
            str(f["arrivals"]), num(f["rss_mib"]), num(f["proxy_cpu_ms_per_pred"], ".2f"),
            num(f["proxy_cores"], ".2f"), num(f["polls_per_pred"], ".1f"),
            f"{num(f['healthz_p50_ms'], '.1f')} / {num(f['healthz_p99_ms'], '.1f')}",
            num(f["post_p99_ms"], ".1f"),
            f"{num(f['overhead_p50_ms'])} / {num(f['overhead_p99_ms'])}",
            num(f["lag_p99_ms"], ".1f"), num(f["client_cores"], ".2f"),
            num(f["sim_cores"], ".2f"), f"{f['completed']}/{f['failed']}/{f['errors']}"]


async def _sample(client: httpx.AsyncClient, base: str, step: Step, until: float) -> None:
    """The proxy's in-flight gauge every 2 s until ``until`` (monotonic)."""
    for _ in range(10_000):
        if time.monotonic() >= until:
            return
        with contextlib.suppress(httpx.HTTPError):
            value = metric_value((await client.get(base + "/metrics")).text, IN_FLIGHT)
            if value is not None:
                step.in_flight.append(value)
        await asyncio.sleep(2.0)


async def _polls(client: httpx.AsyncClient, sims: Sequence[Simulator]) -> int:
    total = 0
    for sim in sims:
        total += int((await client.get(sim.url + "/_sim/stats")).json()["polls"])
    return total


async def drive(args: argparse.Namespace, base: str, key: str | None, sims: list[Simulator],
                proxy_pid: int, probes: Path, started_at: float) -> list[Step]:
    load = PredictionLoad(
        base, bearer(key), body=lambda t: {"prompt": f"inflight #{t.index} [sim:latency="
                                           f"{t.job_s}]", "size": "1024*1024", "seed": t.index},
        job_range=args.job_range, connections=args.connections,
        check_connections=args.check_connections, check_after=args.check_after,
        max_checks=args.max_checks, max_backlog=args.max_backlog, seed=args.seed)
    steps: list[Step] = []
    watch = {"proxy": proxy_pid, **{f"sim{i}": s.pid for i, s in enumerate(sims)}}
    checker = asyncio.create_task(load.checker.run(load.done, deadline=math.inf))
    lo, hi = args.job_range
    settle = hi + 1.0 if args.settle is None else args.settle
    try:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as side:
            for i, target in enumerate(args.targets):
                rate = args.rates[i] if args.rates else target / ((lo + hi) / 2)
                left = args.max_time - (time.monotonic() - started_at)
                if left < settle + args.window + hi + args.check_after + args.drain:
                    log(f"stopping before target {target}: --max-time leaves {left:.0f}s")
                    break
                step = Step(target, rate)
                steps.append(step)
                log(f"step {target}: {rate:.1f}/s, {settle:.0f}s settling + {args.window:.0f}s")
                feed = asyncio.create_task(arrivals(rate, settle + args.window, load.fire))
                await asyncio.sleep(settle)
                polls0 = await _polls(side, sims)
                step.w0, window = time.monotonic(), CpuWindow(watch)
                prof = Profiler(proxy_pid, args.profile / f"proxy-{target}.txt",
                                args.profile_rate) if args.profile else None
                await _sample(side, base, step, step.w0 + args.window - 0.5)
                await feed
                step.w1, cpu = time.monotonic(), window.stop()
                step.cpu = CpuUsage(cpu.wall_s, {
                    "proxy": cpu.trees["proxy"],
                    "simulators": sum(v for k, v in cpu.trees.items() if k != "proxy")},
                    cpu.own_s, cpu.other_s)
                step.polls = await _polls(side, sims) - polls0
                if args.workers > 1:  # the replica is a process tree: sum it
                    step.rss = step.peak_rss = tree_rss_bytes(proxy_pid)
                else:
                    step.rss, step.peak_rss = rss_bytes(proxy_pid)
                step.probes, step.probe_failed = read_probes(probes, step.w0, step.w1)
                step.preds = [t for t in load.all if step.w0 <= t.due < step.w1]
                if prof is not None:
                    summary = await asyncio.to_thread(prof.stop)
                    log(summary or "(no profile)")
                f = step.figures()
                log("  " + " | ".join(f"{h}={c}" for h, c in zip(HEADERS, cells(f),
                                                                   strict=True)))
                bad = sum(t.error is not None for t in step.preds)
                if not args.no_stop and (bad > 0.05 * max(1, f["arrivals"])
                                         or f["lag_p99_ms"] > 5000):
                    log(f"stopping the ramp: {bad} POSTs failed or shed, POST lag p99 "
                        f"{f['lag_p99_ms']:.0f} ms (the proxy does not take the rate)")
                    break
        load.stop_arriving()
        log(f"draining: {load.checker.open} predictions open")
        drain = hi + args.check_after + args.drain
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(checker), timeout=drain)
    finally:
        load.arriving = False
        checker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checker
        await load.aclose()
    load.finish()
    for step in steps:  # what the checks learned since
        step.preds = [t for t in load.all if step.w0 <= t.due < step.w1]
    kinds: dict[str, int] = {}
    for t in load.all:
        if t.error:
            kinds[t.error] = kinds.get(t.error, 0) + 1
    if kinds or load.checker.error_kinds:
        log(f"errors: {kinds} checks: {dict(load.checker.error_kinds)} "
            f"{load.checker.first_errors}")
    log(f"client: {len(load.all)} predictions, {load.checker.gets} GETs "
        f"({load.checker.gets / max(1, len(load.all)):.2f}/pred), {load.shed} shed")
    return steps


async def run(args: argparse.Namespace) -> tuple[list[Step], dict[str, Any]]:
    cancel_on_sigterm()
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet, log)
    with tempfile.TemporaryDirectory(prefix="flux-inflight-") as tmp, services() as started:
        workdir = Path(tmp)
        started_at = time.monotonic()
        sims = []
        for kind in args.providers:  # job latency: per job, by prompt directive
            sims.append(start_simulator(kind, 1.0, workdir))
            started.append(sims[-1])
        if args.db == "postgres":
            await reset_postgres(args.pg_url, force=args.pg_force)
        url = (f"sqlite+aiosqlite:///{workdir / 'proxy.db'}" if args.db == "sqlite"
               else args.pg_url)
        port = free_port()
        settings: dict[str, Any] = {"max_connections": args.upstream_connections}
        providers: dict[str, dict[str, Any]] = {
            name: {"enabled": False} for name in ("wavespeed", "vibedream")}
        for kind, sim in zip(args.providers, sims, strict=True):
            providers[kind] = {"base_url": sim.url, **settings}
        routing = {"routes": {"flux-dev": {"strategy": "weighted", "weights": dict.fromkeys(
            args.providers, 1.0)}}} if len(args.providers) > 1 else None
        config = proxy_config(port, url, instance_id="inflight", order=args.providers,
                              providers=providers, routing=routing)
        if args.workers > 1:  # one replica, N processes on one port (`serve --workers`)
            config["workers"] = args.workers
        proxy, env = start_proxy(workdir, args.db, config)
        started.append(proxy)
        base = f"http://{HOST}:{port}"
        key = cli_client_key(env, f"inflight-{port}")
        probes = workdir / "healthz.txt"
        started.append(start_prober(base + "/healthz", probes, workdir / "prober.log",
                                    interval_s=args.probe_interval, max_s=args.max_time + 60))
        steps = await drive(args, base, key, sims, proxy.pid, probes, started_at)
        if args.keep_logs:
            copy_logs(workdir, args.keep_logs)
    return steps, config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/inflight.py", description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=csv_list(int, required=True),
                    default=[1000, 2500, 5000, 10000],
                    help="predictions in flight per step (default 1000,2500,5000,10000)")
    ap.add_argument("--rates", type=csv_list(float),
                    help="arrivals/s per step (default: target / mean job duration)")
    ap.add_argument("--job-range", type=csv_list(float), default=[10.0, 30.0], metavar="LO,HI",
                    help="upstream job duration, uniform per job, seconds (default 10,30)")
    ap.add_argument("--providers", type=csv_list(str, ["wavespeed", "vibedream"],
                    required=True), default=["wavespeed"],
                    help="simulators behind the proxy (two: weighted 1:1; default wavespeed)")
    ap.add_argument("--window", type=float, default=20.0, help="measured seconds per step")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds at the step's rate before measuring (default: longest job+1)")
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--workers", type=int, default=1,
                    help="server processes of the one replica (flux-proxy serve --workers)")
    add_postgres_args(ap, DEFAULT_PG_URL)
    ap.add_argument("--upstream-connections", type=int, default=200,
                    help="the proxy's max_connections per provider (default 200, its own)")
    ap.add_argument("--connections", type=int, default=128,
                    help="client connections for POSTs (bounds the POSTs in flight)")
    ap.add_argument("--check-connections", type=int, default=32,
                    help="client connections for result checks")
    ap.add_argument("--check-after", type=float, default=2.5,
                    help="first check this long after the job should have ended (then every 2s)")
    ap.add_argument("--max-checks", type=int, default=60, help="GETs per prediction at most")
    ap.add_argument("--max-backlog", type=int, default=2000,
                    help="arrivals waiting for a POST connection beyond which they are shed")
    ap.add_argument("--probe-interval", type=float, default=0.05, help="/healthz every S s")
    ap.add_argument("--drain", type=float, default=60.0,
                    help="seconds after the last job should have ended to collect results")
    ap.add_argument("--max-time", type=float, default=600.0,
                    help="no step starts unless it and the drain fit in this (seconds)")
    ap.add_argument("--no-stop", action="store_true",
                    help="keep ramping after a step that overloaded the proxy")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="first wait up to S seconds for other processes to leave the CPUs "
                    "idle (shared machines)")
    ap.add_argument("--seed", type=int, default=1, help="job durations' RNG seed")
    ap.add_argument("--quick", action="store_true",
                    help="~60 s smoke run: 100 then 500 in flight, 2-4 s jobs")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--profile", type=Path, help="py-spy on the proxy per window, into DIR")
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s")
    ap.add_argument("--keep-logs", type=Path, help="copy the processes' logs here")
    args = ap.parse_args(argv)
    if args.quick:
        args.targets, args.job_range, args.window = [100, 500], [2.0, 4.0], 10.0
        args.drain, args.rates = 20.0, None
    if len(args.job_range) != 2 or not 0 < args.job_range[0] <= args.job_range[1]:
        ap.error("--job-range is LO,HI with 0 < LO <= HI")
    if args.rates and len(args.rates) != len(args.targets):
        ap.error("--rates needs one rate per --targets step")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    begun = time.time()
    with event_loop_runner() as runner:
        try:
            steps, config = runner.run(run(args))
        except (asyncio.CancelledError, KeyboardInterrupt):
            log("interrupted; the simulators and the proxy were stopped")
            return 130
    figures = [s.figures() for s in steps]
    lo, hi = args.job_range
    print(f"\nmachine: {info['nproc']} cores, {info['cpu']}, {info['mem_gib']} GiB, "
          f"Python {info['python']}; run took {time.time() - begun:.0f} s")
    print(f"one proxy on {args.db}, upstream {'+'.join(args.providers)} simulator(s), jobs "
          f"{lo:g}-{hi:g} s uniform, async POSTs, checks once after the job's end then "
          f"every 2 s; {args.window:g} s measured per step")
    print("proxy config: log_level=warning, max_connections="
          f"{args.upstream_connections} per provider; every other setting at its default "
          "(polling 0.25 s x1.5 up to 2 s, deadline_s 300, prediction_deadline_s 600, "
          "lease_s 30); none of its limits refuses 10,000 in flight, so none was raised\n")
    print(render_table(HEADERS, [cells(f) for f in figures]))
    notes = load_notes((f"target {f['target']}", f["other_cores"]) for f in figures
                       if not math.isnan(f["other_cores"]))
    print("\n".join(notes))
    print("\nin flight: the proxy's gauge, mean over the window; CPU ms/pred: proxy CPU over "
          "the window / predictions arriving in it; polls/pred: upstream GETs / arrivals; "
          "overhead: completed_at - POST sent - job duration; lag: POST sent - scheduled "
          "(the load generator's own delay); client cores: this process")
    if args.json:
        write_json(args.json, {"machine": info, "argv": sys.argv, "args": vars(args),
                               "proxy_config": config, "steps": figures})
    return 1 if any(f["errors"] for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
