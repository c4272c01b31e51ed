"""Proxy replicas on one PostgreSQL: open-loop sync predictions at rising rates.

Processes on 127.0.0.1: one WaveSpeed simulator (``flux-proxy simulate wavespeed``, a
fixed ``--job-latency``), N proxy replicas (``flux-proxy serve``, each its own port,
TOML config and instance id, ``--workers`` processes each, all on one ``flux_bench*``
PostgreSQL database and that simulator) and this process, the load generator. For each
replica count (``--replicas``, default 1 then 2), the database is emptied, the replicas
start (the first migrates, then the rest), a client key is made (``flux-proxy keys
create``), and arrivals come at fixed rates (``--rates``), each step ``--step`` seconds:
open loop, every arrival sent when due whatever the answers do, round-robin over the
replicas, ``POST /v1/predictions`` in sync mode (the answer is the finished prediction).
The proxy polls the simulator at its defaults (0.25 s x1.5 up to 2 s).

Per step, over its window (the step less its first ``--settle`` seconds): completed per
second (answers 200 ``completed`` that came within the window), end-to-end p50/p99 of
the window's arrivals (POST sent to answer), the proxy's own time (its
``x-flux-proxy-overhead-ms`` header: the request's wall time less its upstream
attempts) and end to end less the job latency (that plus the polling lag), how late
POSTs went out (lag), errors by kind, each replica's RSS (its process tree, peak), CPU
per completed prediction (the replicas' trees) and cores used by the replicas, the
simulator, PostgreSQL's backends of the database, this process and everything else.
A replica count stops rising after a step with > 5% errors, p99 over 10x the job
latency, or under 70% of the offered rate done (saturated).

    .venv/bin/python -m bench.load --quick          # smoke run, < 60 s
    .venv/bin/python -m bench.load                  # 1 and 2 replicas, 20..320/s (~3.5 min)
    .venv/bin/python bench/load.py --replicas 1,2,3 --rates 50,100,200 --json load.json

Every loop is bounded by a count and a time, the run by ``--max-time``; the children are
stopped on exit.
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
from pathlib import Path
from typing import Any

if not __package__:  # run by path: this checkout's bench/, not one on PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.harness.cpu import CpuWindow, machine_info, wait_quiet
from bench.harness.litellm import RssPeak, tree_rss_bytes
from bench.harness.openloop import arrivals
from bench.harness.procs import (
    HOST,
    Service,
    cancel_on_sigterm,
    copy_logs,
    event_loop_runner,
    free_port,
    services,
)
from bench.harness.proxy import (
    add_postgres_args,
    bearer,
    cli_client_key,
    proxy_config,
    reset_postgres,
    start_proxy,
)
from bench.harness.report import csv_list, load_notes, render_table, write_json
from bench.harness.simulators import Simulator, start_simulator
from bench.harness.syncload import (
    HEADERS,
    MiB,
    PgBackends,
    Step,
    SyncLoad,
    best_ratio,
    cells,
    stop_reason,
)

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/flux_bench_load"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- driver


async def _polls(sim: Simulator) -> int:
    """The polls the simulator has answered so far (-1 when it cannot tell)."""
    try:
        return int((await asyncio.to_thread(sim.control, "/_sim/stats"))["polls"])
    except (OSError, ValueError, KeyError, httpx.HTTPError):
        return -1


async def run_step(load: SyncLoad, step: Step, args: argparse.Namespace,
                   watch: dict[str, int], pg: PgBackends, sim: Simulator) -> None:
    """Arrivals at ``step.rate`` for ``--step`` s (at most ``--max-per-step``); CPU and
    RSS over the window after ``--settle``; then the answers, within the drain."""
    reqs = load.new_step()
    count = max(1, min(round(step.rate * args.step), args.max_per_step))
    duration = count / step.rate
    feed = asyncio.create_task(arrivals(step.rate, duration, load.fire))
    try:
        await asyncio.sleep(min(args.settle, duration / 2))
        polls0 = await _polls(sim)
        step.w0, window, pg0 = time.monotonic(), CpuWindow(watch), await pg.sample()
        rss = RssPeak({k: v for k, v in watch.items() if k.startswith("replica")}, 0.5)
        rss.start()
        try:
            await feed
        finally:
            peaks = await rss.stop()
        step.w1, step.cpu = time.monotonic(), window.stop()
        step.pg_cpu_s = PgBackends.spent(pg0, await pg.sample())
        polls1 = await _polls(sim)
        step.polls = polls1 - polls0 if min(polls0, polls1) >= 0 else -1
        step.rss_peak = list(peaks.values())
    finally:
        feed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feed
        left = await load.drain(args.client_timeout + 2.0)
        if left:
            log(f"  {left} requests still out after the drain: cancelled")
    step.reqs = reqs


def replica_config(args: argparse.Namespace, sim: Simulator, port: int, name: str
                   ) -> dict[str, Any]:
    wavespeed: dict[str, Any] = {"base_url": sim.url,
                                 "max_connections": args.upstream_connections}
    if args.poll_interval:
        wavespeed |= {"poll_initial_s": args.poll_interval, "poll_max_s": args.poll_interval,
                      "poll_multiplier": 1.0}
    if args.native_sync:
        wavespeed["use_native_sync"] = True
    config = proxy_config(port, args.pg_url, instance_id=name, order=["wavespeed"],
                          providers={"wavespeed": wavespeed, "vibedream": {"enabled": False}},
                          sync_timeout_s=args.sync_timeout)
    if args.workers > 1:
        config["workers"] = args.workers
    return config


async def run_phase(args: argparse.Namespace, n: int, sim: Simulator, workdir: Path,
                    deadline: float) -> tuple[list[Step], dict[str, Any]]:
    """``n`` replicas on a fresh database through the rates; the steps and what started."""
    await reset_postgres(args.pg_url, force=args.pg_force)
    steps: list[Step] = []
    meta: dict[str, Any] = {"replicas": n, "ports": [], "rss_idle_mib": []}
    with services() as started:
        replicas: list[Service] = []
        env: dict[str, str] = {}
        for i in range(n):  # one at a time: the first migrates
            port = free_port()
            proxy, e = start_proxy(workdir, f"r{n}-{i}",
                                   replica_config(args, sim, port, f"load-r{n}-{i}"))
            started.append(proxy)
            replicas.append(proxy)
            env = env or e
            meta["ports"].append(port)
        key = cli_client_key(env, f"load-r{n}")
        bases = [f"http://{HOST}:{p}" for p in meta["ports"]]
        load = SyncLoad(bases, bearer(key), connections=args.connections,
                        timeout_s=args.client_timeout, max_backlog=args.max_backlog)
        pg = PgBackends(args.pg_url)
        watch = {f"replica{i}": r.pid for i, r in enumerate(replicas)} | {"simulator": sim.pid}
        try:
            if args.warmup > 0:  # first requests: connections, caches; not recorded
                load.new_step()
                rate = min(args.rates[0], 20.0)
                await arrivals(rate, args.warmup, load.fire)
                await load.drain(args.client_timeout + 2.0)
            await asyncio.sleep(1.0)
            meta["rss_idle_mib"] = [tree_rss_bytes(r.pid) / MiB for r in replicas]
            for rate in args.rates:
                need = args.step + 2 * args.job_latency + 3.0
                if time.monotonic() + need > deadline:
                    log(f"[{n} replica(s)] stopping before {rate:g}/s: --max-time")
                    break
                log(f"[{n} replica(s)] {rate:g}/s for {args.step:g} s ...")
                step = Step(n, rate, args.job_latency)
                await run_step(load, step, args, watch, pg, sim)
                steps.append(step)
                f = step.figures()
                step.stop = stop_reason(f, args.job_latency)
                log("  " + " | ".join(f"{h}={c}" for h, c in zip(HEADERS, cells(f),
                                                                   strict=True)))
                if step.stop and not args.no_stop:
                    log(f"  stopping the ramp: {step.stop}")
                    break
                await asyncio.sleep(1.0)  # the replicas finish their writes
        finally:
            await load.aclose()
            await pg.aclose()
    return steps, meta


async def run(args: argparse.Namespace) -> tuple[list[Step], list[dict[str, Any]]]:
    cancel_on_sigterm()
    deadline = time.monotonic() + args.max_time
    steps: list[Step] = []
    metas: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flux-load-") as tmp, services() as started:
        workdir = Path(tmp)
        sim = start_simulator("wavespeed", args.job_latency, workdir, name="simulator")
        started.append(sim)
        try:
            for n in args.replicas:
                if args.wait_quiet > 0:  # before each replica count: comparable phases
                    await asyncio.to_thread(wait_quiet, args.wait_quiet, log,
                                            ours={"simulator": sim.pid})
                    deadline += args.wait_quiet  # the wait is not the run's time
                got, meta = await run_phase(args, n, sim, workdir, deadline)
                steps += got
                metas.append(meta)
        finally:
            if args.keep_logs:
                copy_logs(workdir, args.keep_logs)
    return steps, metas


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/load.py",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--replicas", type=csv_list(int, required=True), default=[1, 2],
                    help="replica counts, one after the other (default 1,2)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes per replica (flux-proxy serve --workers; default 1)")
    ap.add_argument("--rates", type=csv_list(float, required=True),
                    default=[20.0, 40.0, 80.0, 160.0, 320.0],
                    help="arrivals per second, rising (default 20,40,80,160,320)")
    ap.add_argument("--step", type=float, default=15.0, help="seconds per rate (default 15)")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="first seconds of each step not measured (default 3)")
    ap.add_argument("--max-per-step", type=int, default=6000,
                    help="arrivals per step at most (default 6000)")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="seconds of unrecorded load after the replicas start (default 3)")
    ap.add_argument("--job-latency", type=float, default=1.0,
                    help="the simulator's fixed job latency, s (default 1)")
    ap.add_argument("--poll-interval", type=float, default=0.0,
                    help="proxy -> simulator poll every S s (default: the proxy's own "
                    "0.25 s x1.5 up to 2 s)")
    ap.add_argument("--native-sync", action="store_true",
                    help="the proxy uses WaveSpeed's native sync mode instead of polling")
    ap.add_argument("--sync-timeout", type=float, default=30.0,
                    help="the proxy's sync_timeout_s (then it answers 202; default 30)")
    ap.add_argument("--connections", type=int, default=512,
                    help="client connections per replica at most (default 512)")
    ap.add_argument("--max-backlog", type=int, default=4000,
                    help="requests outstanding past which an arrival is shed (default 4000)")
    ap.add_argument("--upstream-connections", type=int, default=400,
                    help="each replica's max_connections to the simulator (default 400)")
    add_postgres_args(ap, DEFAULT_PG_URL)
    ap.add_argument("--max-time", type=float, default=420.0,
                    help="no step starts unless it fits in this many seconds (default 420)")
    ap.add_argument("--no-stop", action="store_true",
                    help="go on raising the rate after a step that overloaded the replicas")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each replica count, wait up to S s for the machine "
                    "to go idle (shared machines)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 60 s): 1 and 2 replicas at 20 and 60/s, 5 s steps")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--keep-logs", type=Path, help="copy the children's logs here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rates, args.step, args.settle, args.warmup = [20.0, 60.0], 5.0, 2.0, 1.0
        args.max_time = min(args.max_time, 55.0)
    if min(args.replicas) < 1 or args.workers < 1 or min(args.rates) <= 0:
        ap.error("replicas, workers and rates must be positive")
    if args.step <= args.settle or args.job_latency <= 0:
        ap.error("--step must be longer than --settle; --job-latency > 0")
    args.client_timeout = args.sync_timeout + 10.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    begun = time.time()
    with event_loop_runner() as runner:
        try:
            steps, metas = runner.run(run(args))
        except (asyncio.CancelledError, KeyboardInterrupt):
            log("interrupted; the children were stopped")
            return 130
    figures = [s.figures() for s in steps]
    ratio = best_ratio(figures, args.replicas)
    upstream = ("WaveSpeed native sync" if args.native_sync else
                f"polled every {args.poll_interval:g} s" if args.poll_interval else
                "polled at the proxy's defaults (0.25 s x1.5 up to 2 s)")
    print(f"\nmachine: {info['nproc']} cores, {info['cpu']}, {info['mem_gib']} GiB, "
          f"Python {info['python']}; run took {time.time() - begun:.0f} s")
    print(f"replicas on PostgreSQL ({args.pg_url.rsplit('/', 1)[-1]}), {args.workers} "
          f"process(es) each; one WaveSpeed simulator, job latency {args.job_latency:g} s, "
          f"{upstream}; open-loop sync POSTs round-robin; {args.step:g} s per step, "
          f"measured after {args.settle:g} s")
    for m in metas:
        print(f"- {m['replicas']} replica(s): idle RSS "
              f"{' / '.join(f'{v:.0f}' for v in m['rss_idle_mib'])} MiB")
    print()
    print(render_table(HEADERS, [cells(f) for f in figures]))
    for f in figures:
        if f["stop"]:
            print(f"\n{f['replicas']} replica(s) stopped after {f['rate']:g}/s: {f['stop']}",
                  end="")
    print()
    for name, value in ratio.items():
        print(f"\nratio {name}: {value:.2f}")
    notes = load_notes((f"{f['replicas']} replica(s) at {f['rate']:g}/s", f["other_cores"])
                       for f in figures if not math.isnan(f["other_cores"]))
    print("\n".join(notes))
    print("\ndone/s: 200 completed answers within the window; e2e: POST sent to answer; "
          "overhead hdr: x-flux-proxy-overhead-ms (wall time less upstream attempts); "
          "e2e - job: end to end less the job latency (the proxy's time and its polling "
          "lag); lag: POST sent - due; CPU ms/pred: the replicas' CPU / done; other: "
          "the rest of the machine less PostgreSQL's backends")
    if args.json:
        write_json(args.json, {"machine": info, "argv": sys.argv, "args": vars(args),
                               "phases": metas, "steps": figures, "ratios": ratio})
    firsts = [f for f in figures if f is next(g for g in figures
                                              if g["replicas"] == f["replicas"])]
    return 1 if not figures or any(f["errors"] or not f["ok"] for f in firsts) else 0


if __name__ == "__main__":
    sys.exit(main())
