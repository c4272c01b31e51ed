"""flux-proxy side by side with LiteLLM's proxy: same machine, same run, same latency.

Processes on 127.0.0.1:

* flux-proxy as ``overhead.py`` runs it: ``flux-proxy serve`` (a temporary TOML config,
  a fresh SQLite file or a ``flux_bench*`` PostgreSQL database) in front of
  ``flux-proxy simulate wavespeed`` with a fixed job latency, in sync mode, with a client
  key (``flux-proxy keys create``), so requests pay for authentication;
* with ``--with-litellm``: LiteLLM's proxy (``litellm[proxy]``, pinned, installed into a
  venv of its own: ``bench/harness/litellm.py``) routing one model as an OpenAI-compatible
  ``api_base`` to a fake OpenAI image upstream with the same latency
  (``bench/harness/fake_openai.py``); no database, a master key (sent by the client);
* this process, the load generator (closed loop, one connection per worker).

Each proxy is compared with its own upstream called directly: "added" is the proxy's
percentile minus the upstream's. CPU per request is the server's process tree
(``/proc``, all its workers) over the measured window divided by the requests done; RSS
is the tree's resident memory summed, idle after start and peak during the load.

    .venv/bin/python -m bench.compare --with-litellm --quick   # smoke run (< 60 s)
    .venv/bin/python -m bench.compare --with-litellm           # the full run (~3 min)
    .venv/bin/python bench/compare.py --with-litellm --db sqlite,postgres --json out.json

Every loop is bounded by a count and a time limit; the children are stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

if not __package__:  # run by path: this checkout's bench/, not one on PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import litellm as ll
from bench.harness import procs
from bench.harness.cpu import machine_info, process_tree, wait_quiet
from bench.harness.fake_openai import GENERATIONS, check_images, start_fake_openai
from bench.harness.load import BenchError, json_object
from bench.harness.procs import (
    HOST,
    Service,
    clean_env,
    cli,
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
    toml_dumps,
)
from bench.harness.report import csv_list, load_notes, ms, render_table, write_json
from bench.harness.simulators import SIM_KEY, start_simulator
from bench.overhead_ops import BODY, PROXY_SUBMIT, SIM_SUBMIT

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/flux_bench_compare"
MIB = 1024 * 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- operations


def _sim_ok(r: httpx.Response) -> None:
    body = json_object(r, 200)
    data = body.get("data")
    if body.get("code") != 200 or not isinstance(data, dict) or data.get("status") != "completed":
        raise BenchError(f"simulator sync: code {body.get('code')}")


def _proxy_ok(r: httpx.Response) -> None:
    body = json_object(r, (200, 202))
    if r.status_code != 200 or body.get("status") != "completed":
        raise BenchError(f"proxy sync: {r.status_code} {body.get('status')}")


@dataclass
class System:
    """A proxy, its upstream, the two endpoints, and what was measured."""

    label: str
    direct: ll.Endpoint
    via: ll.Endpoint
    server: Service
    upstream: Service
    note: str
    rss_idle: int = 0
    rss_peak: int = 0
    processes: int = 0
    cells: dict[str, ll.Cell] = field(default_factory=dict)

    def cell(self, side: str, conc: int) -> ll.Cell:
        return self.cells[f"{side} c{conc}"]

    def added(self, conc: int, q: float) -> float:
        return self.cell("via", conc).p(q) - self.cell("direct", conc).p(q)


# --------------------------------------------------------------------------- report


def _f(value: float, fmt: str = ".0f") -> str:
    return "-" if math.isnan(value) else format(value, fmt)


def _rows(c: int) -> list[tuple[str, Callable[[System], str]]]:
    """The table's rows for concurrency ``c``: (label, cell of a system)."""
    if c == 1:
        return [("upstream p50 / p99 c=1 (ms)", lambda s: f"{ms(s.cell('direct', 1).p(50))} / "
                 f"{ms(s.cell('direct', 1).p(99))}"),
                ("added p50 c=1 (ms)", lambda s: ms(s.added(1, 50), signed=True)),
                ("added p99 c=1 (ms)", lambda s: ms(s.added(1, 99), signed=True))]
    return [(f"req/s c={c}", lambda s: _f(s.cell("via", c).rps)),
            (f"upstream alone req/s c={c}", lambda s: _f(s.cell("direct", c).rps)),
            (f"p99 c={c} (ms)", lambda s: ms(s.cell("via", c).p(99))),
            (f"added p99 c={c} (ms)", lambda s: ms(s.added(c, 99), signed=True))]


def _cpu_row(c: int) -> tuple[str, Callable[[System], str]]:
    return f"CPU ms/req c={c}", lambda s: _f(s.cell("via", c).cpu_ms_per_req, ".2f")


def _errors(s: System) -> str:
    via = sum(x.errors for k, x in s.cells.items() if k.startswith("via"))
    direct = sum(x.errors for k, x in s.cells.items() if k.startswith("direct"))
    return f"{via} / {direct}" + (" (cut)" if any(x.truncated for x in s.cells.values()) else "")


def table(systems: Sequence[System], concs: Sequence[int]) -> str:
    """Metrics as rows, one column per system (latencies in ms)."""
    rows = [row for c in concs for row in _rows(c)] + [_cpu_row(c) for c in concs] + [
        ("RSS idle (MiB)", lambda s: _f(s.rss_idle / MIB)),
        ("RSS peak (MiB)", lambda s: _f(s.rss_peak / MIB)),
        ("processes", lambda s: str(s.processes)),
        ("errors via / direct", _errors)]
    return render_table(["", *(s.label for s in systems)],
                        [[name, *(cell(s) for s in systems)] for name, cell in rows])


def ratios(systems: Sequence[System], concs: Sequence[int]) -> dict[str, float]:
    """flux-proxy req/s / LiteLLM req/s at c=50 (else the first concurrency above 1)."""
    at = 50 if 50 in concs else next((c for c in concs if c > 1), None)
    lite = [s for s in systems if s.label.startswith("LiteLLM")]
    if at is None or not lite:
        return {}
    base = lite[0].cell("via", at).rps
    return {f"{s.label} / {lite[0].label} req/s c={at}": s.cell("via", at).rps / base
            for s in systems if s not in lite and base > 0}


# --------------------------------------------------------------------------- driver


def flux_serve_args(workers: int | None) -> tuple[list[str], str]:
    """``--workers N`` for `flux-proxy serve` where its --help has it; and what ran."""
    if workers is None:
        return [], "1 process"
    done = subprocess.run([*cli(), "serve", "--help"], capture_output=True, text=True,
                          timeout=60, check=False, env=clean_env())
    if "--workers" in done.stdout:
        return ["--workers", str(workers)], f"--workers {workers}"
    return [], f"1 process: `flux-proxy serve` has no --workers, --workers {workers} ignored"


def start_flux(workdir: Path, tag: str, config: dict[str, Any], serve_args: list[str]
               ) -> tuple[Service, dict[str, str]]:
    """harness.proxy.start_proxy, with extra `serve` arguments."""
    path = workdir / f"proxy-{tag}.toml"
    path.write_text(toml_dumps(config))
    env = clean_env() | {"FLUX_PROXY_CONFIG": str(path)}
    svc = Service(f"proxy[{tag}]", [*cli(), "serve", *serve_args], workdir / f"proxy-{tag}.log",
                  env=env)
    try:
        svc.wait_ready(f"http://{HOST}:{config['port']}/healthz")
    except BaseException:
        svc.stop()
        raise
    return svc, env


async def run(args: argparse.Namespace, install: ll.Install | None) -> list[System]:
    procs.cancel_on_sigterm()  # the finally blocks stop every child
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet, log)
    serve_args, flux_note = flux_serve_args(args.workers)
    flux_note += ", " + ("WaveSpeed native sync" if args.native_sync else
                         f"sync emulated by polling every {args.poll_interval * 1000:.0f} ms")
    sync = {"enable_sync_mode": True} | ({"enable_base64_output": True} if args.b64 else {})
    systems: list[System] = []
    with tempfile.TemporaryDirectory(prefix="flux-bench-") as tmp, services() as started:
        workdir = Path(tmp)
        sim = start_simulator("wavespeed", args.job_latency, workdir, name="simulator")
        started.append(sim)
        # overhead.py's provider settings: sync is emulated by polling every --poll-interval
        # (or, with --native-sync, WaveSpeed's own sync mode).
        wavespeed = {"base_url": sim.url, "poll_initial_s": args.poll_interval,
                     "poll_multiplier": 1.0, "poll_max_s": args.poll_interval,
                     "read_timeout_s": 60.0, "max_connections": 400,
                     **({"use_native_sync": True} if args.native_sync else {})}
        for db in args.db:
            url = (f"sqlite+aiosqlite:///{workdir / 'proxy.db'}" if db == "sqlite"
                   else args.pg_url)
            if db == "postgres":
                await reset_postgres(url, force=args.pg_force)
            port = free_port()
            config = proxy_config(port, url, instance_id=f"bench-{db}", order=["wavespeed"],
                                  providers={"wavespeed": wavespeed,
                                             "vibedream": {"enabled": False}})
            proxy, env = start_flux(workdir, db, config, serve_args)
            started.append(proxy)
            key = cli_client_key(env, f"compare-{os.getpid()}-{port}")
            systems.append(System(
                f"flux-proxy {db}", server=proxy, upstream=sim, note=flux_note,
                direct=ll.Endpoint(sim.url, SIM_SUBMIT, BODY | sync, _sim_ok, bearer(SIM_KEY)),
                via=ll.Endpoint(f"http://{HOST}:{port}", PROXY_SUBMIT, BODY | sync, _proxy_ok,
                             bearer(key))))
        if install is not None:
            fake = start_fake_openai(args.job_latency, workdir, b64=args.b64)
            started.append(fake)
            log(f"starting LiteLLM {install.version} ...")
            lite, lite_url, lite_key = ll.start_litellm(install, workdir, fake.url,
                                           workers=args.litellm_workers)
            started.append(lite)
            body = ll.images_body()
            systems.append(System(
                f"LiteLLM {install.version}", server=lite, upstream=fake,
                note=(f"--num_workers {args.litellm_workers}" if args.litellm_workers
                      else "LiteLLM's default workers (1)") + ", uvicorn, no DB, master key",
                direct=ll.Endpoint(fake.url, GENERATIONS, body, check_images,
                                   bearer(ll.UPSTREAM_KEY)),
                via=ll.Endpoint(lite_url, GENERATIONS, body, check_images, bearer(lite_key))))
        await asyncio.sleep(args.settle)
        for s in systems:
            s.rss_idle = ll.tree_rss_bytes(s.server.pid)
            s.processes = len(process_tree(s.server.pid))
        sampler = ll.RssPeak({s.label: s.server.pid for s in systems})
        sampler.start()
        try:
            for conc in args.concurrency:
                n = args.serial_requests if conc == 1 else args.requests
                for s in systems:
                    for side in ("direct", "via"):
                        log(f"[{s.label}] {side} c={conc} ...")
                        cell = await ll.measure(
                            getattr(s, side), conc, n, warmup=args.warmup,
                            op_timeout_s=args.op_timeout, window_s=args.cell_timeout,
                            server_pid=s.server.pid, upstream_pid=s.upstream.pid)
                        s.cells[f"{side} c{conc}"] = cell
                        if cell.error_kinds:
                            log(f"  errors: {cell.error_kinds}")
                        cpu = cell.server_cpu_s if side == "via" else cell.upstream_cpu_s
                        log(f"  n={cell.n} rps={cell.rps:.0f} p50={ms(cell.p(50))} "
                            f"p99={ms(cell.p(99))} {'proxy' if side == 'via' else 'upstream'} "
                            f"CPU ms/req={cpu / max(cell.n, 1) * 1000:.2f}")
        finally:
            peaks = await sampler.stop()
        for s in systems:
            s.rss_peak = peaks[s.label]
        if args.keep_logs:
            procs.copy_logs(workdir, args.keep_logs)
    return systems


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/compare.py",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--with-litellm", action="store_true",
                    help=f"also run LiteLLM's proxy (litellm[proxy]=={ll.PIN}, own venv)")
    ap.add_argument("--litellm-version", default=ll.PIN, help=f"default {ll.PIN}")
    ap.add_argument("--litellm-venv", type=Path,
                    help=f"reuse this venv (whatever litellm it has; installed if none); "
                    f"default {ll.default_venv()}, reused when it has --litellm-version")
    ap.add_argument("--litellm-workers", type=int, help="LiteLLM --num_workers (default: its own)")
    ap.add_argument("--workers", type=int,
                    help="flux-proxy serve --workers N, where `serve` has that option")
    ap.add_argument("--db", type=csv_list(str, ["sqlite", "postgres"], required=True),
                    default=["sqlite"], help="comma list: sqlite, postgres (default sqlite)")
    add_postgres_args(ap, DEFAULT_PG_URL)
    ap.add_argument("--concurrency", type=csv_list(int, required=True), default=[1, 50, 200],
                    help="comma list (default 1,50,200)")
    ap.add_argument("--requests", type=int, default=2000,
                    help="requests per cell at concurrency > 1 (default 2000)")
    ap.add_argument("--serial-requests", type=int, default=200,
                    help="requests per cell at concurrency 1 (default 200)")
    ap.add_argument("--warmup", type=int, default=50,
                    help="warm-up requests per cell, at least the concurrency (0: none)")
    ap.add_argument("--job-latency", type=float, default=0.05,
                    help="both upstreams' fixed latency, s (default 0.05)")
    ap.add_argument("--poll-interval", type=float, default=0.02,
                    help="flux-proxy -> simulator poll interval, s (default 0.02, as overhead.py)")
    ap.add_argument("--native-sync", action="store_true",
                    help="flux-proxy uses WaveSpeed's native sync mode instead of polling")
    ap.add_argument("--b64", action="store_true",
                    help="base64 images in the answers instead of URLs (both sides)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds between the last start and the idle RSS reading")
    ap.add_argument("--op-timeout", type=float, default=60.0)
    ap.add_argument("--cell-timeout", type=float, default=120.0,
                    help="no new request starts in a cell after this many seconds")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="first wait up to S s for the machine to go idle")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 60 s): 10 serial / 200 concurrent requests per cell")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--keep-logs", type=Path, help="copy the children's logs here")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.serial_requests = min(args.requests, 200), min(args.serial_requests, 10)
        args.warmup, args.cell_timeout, args.settle = min(args.warmup, 5), 15.0, 1.0
    if min(args.concurrency) < 1 or args.requests < 1 or args.serial_requests < 1:
        ap.error("concurrency and request counts must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    started = time.time()
    install = None
    if args.with_litellm:
        install = ll.ensure_venv(args.litellm_venv or ll.default_venv(), args.litellm_version, log,
                              any_version=args.litellm_venv is not None)
    with event_loop_runner() as runner:
        try:
            systems = runner.run(run(args, install))
        except (asyncio.CancelledError, KeyboardInterrupt):
            log("interrupted; the children were stopped")
            return 130
    elapsed = time.time() - started
    text = table(systems, args.concurrency)
    ratio = ratios(systems, args.concurrency)
    notes = load_notes((f"{s.label} c={c}", s.cell("via", c).other_cpu_s / s.cell("via", c).wall_s)
                       for s in systems for c in args.concurrency if s.cell("via", c).wall_s > 0)
    print(f"\nmachine: {info['nproc']} cores, {info['cpu']}, {info['mem_gib']} GiB, "
          f"Python {info['python']}; run took {elapsed:.0f} s")
    print(f"upstream latency {args.job_latency * 1000:.0f} ms; sync mode; "
          f"{'base64' if args.b64 else 'URL'} outputs; added = proxy - its upstream alone\n")
    for s in systems:
        print(f"- {s.label}: {s.note}")
    print(f"\n{text}")
    for name, value in ratio.items():
        print(f"\nratio {name}: {value:.2f}")
    print("\n".join(notes))
    if args.json:
        write_json(args.json, {
            "machine": info, "argv": sys.argv, "args": vars(args), "elapsed_s": round(elapsed, 1),
            "litellm": {"version": install.version, "venv": install.venv} if install else None,
            "systems": [{"label": s.label, "note": s.note, "rss_idle_bytes": s.rss_idle,
                         "rss_peak_bytes": s.rss_peak, "processes": s.processes,
                         "cells": {k: c.summary() for k, c in s.cells.items()}}
                        for s in systems],
            "ratios": ratio, "table": text,
        })
    return 1 if any(c.errors for s in systems for c in s.cells.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
