"""What failover costs: one provider failing 10% / 50% / 100% of requests, another healthy.

Processes on 127.0.0.1 (the machine this was written for has 2 cores):

* the primary, a WaveSpeed simulator: `flux-proxy simulate wavespeed` for the
  ``submit-5xx`` table (its ``error_rate`` knob: that fraction of submits is answered
  HTTP 500); for the ``after-accept`` table, the same simulator app served by
  ``python -m bench.harness.simulators``, where ``error_rate`` instead means "that
  fraction of *accepted* jobs then fail" (WaveSpeed ``data.code`` 5000). The simulator has
  that fault only as all-or-nothing (``fail_after_accept``) or per request (a
  ``[sim:fail-after-accept]`` prompt directive, which the proxy would forward to the
  secondary too), hence the variant;
* the secondary, a healthy VibeDream simulator (`flux-proxy simulate vibedream`);
* the proxy (`flux-proxy serve`), a fresh process and SQLite file per cell (breaker state
  and metrics are per process), ``routing.order = ["wavespeed", "vibedream"]``;
* this process, the load generator: sync-mode ``POST /v1/predictions`` (with a client
  key made per cell through ``POST /admin/keys``: auth stays on, as in production) from
  ``--concurrency`` workers (closed loop, one connection each), ``size`` 512*512 (one
  both providers take).

The primary serves sync requests with WaveSpeed's native sync mode (one upstream call;
set here, since WaveSpeed is polled by default now);
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
import math
import os
import platform
import re
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

if not __package__:  # run by path: this checkout's bench/, not one on PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.failover_cells import MODES, PRIMARY, SECONDARY, CellResult, CellSpec, Sample, report
from bench.harness import simulators
from bench.harness.cpu import CpuWindow, machine_info, wait_quiet
from bench.harness.load import LoadResult, close_clients, closed_loop, open_clients
from bench.harness.procs import HOST, free_port, services, sigterm_raises
from bench.harness.proxy import admin_client_key, bearer, proxy_config, start_proxy
from bench.harness.report import csv_list, ms, write_json
from bench.harness.simulators import Simulator, start_simulator

SYNC_TIMEOUT_S = 60.0
BREAKER_ON = {"failure_threshold": 5, "error_rate_threshold": 0.5, "window_s": 60.0,
              "min_calls": 20, "cooldown_s": 30.0}  # the proxy's defaults, written out
BREAKER_OFF = {"failure_threshold": 1_000_000_000, "error_rate_threshold": 1.0,
               "window_s": 60.0, "min_calls": 1_000_000_000, "cooldown_s": 30.0}
QUIET_SHARE = 0.15  # --wait-quiet: processes not ours under this share of all CPUs
_FAILOVER_LINE = re.compile(r'^flux_proxy_failovers_total\{(?P<labels>[^}]*)\}\s+(?P<v>\S+)$')


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
    return Sample.from_answer(r.status_code, data, elapsed)


async def load(base_url: str, n: int, concurrency: int, request_timeout_s: float,
               time_limit_s: float, *, headers: dict[str, str] | None = None,
               pin_every: int = 0, offset: int = 0) -> LoadResult[Sample]:
    """`n` sync predictions from `concurrency` closed-loop workers (one connection each);
    no new request starts after `time_limit_s`. `pin_every`: the second request of each
    group of that many is pinned to the secondary."""
    clients = open_clients(base_url, max(1, min(concurrency, n)), request_timeout_s, headers)

    def op(client: httpx.AsyncClient, i: int) -> Any:
        pin = SECONDARY if pin_every and i % pin_every == 1 else None
        return _one(client, _body(offset + i, pin))

    try:
        return await closed_loop(op, clients, n, window_s=time_limit_s)
    finally:
        await close_clients(clients)


def _failovers(metrics_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        m = _FAILOVER_LINE.match(line.strip())
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
            key = f"{labels.get('from')}->{labels.get('to')} {labels.get('reason')}"
            out[key] = out.get(key, 0.0) + float(m.group("v"))
    return out


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


def _proxy_config(spec: CellSpec, port: int, db: Path, primary: Simulator,
                  secondary: Simulator) -> dict[str, Any]:
    order = [SECONDARY] if spec.mode == "secondary-only" else [PRIMARY, SECONDARY]
    provider = {"poll_initial_s": 0.05, "max_connections": 100}
    return proxy_config(
        port, f"sqlite+aiosqlite:///{db}", instance_id="bench-failover", order=order,
        sync_timeout_s=SYNC_TIMEOUT_S,
        routing={"breaker": BREAKER_ON if spec.breaker else BREAKER_OFF},
        # The primary keeps WaveSpeed's native sync (no longer the default) so the
        # figures stay comparable with RESULTS-failover.md.
        providers={PRIMARY: {"base_url": primary.url, "use_native_sync": True, **provider},
                   SECONDARY: {"base_url": secondary.url, **provider}})


def _wait_quiet(watch: dict[str, int], max_s: float) -> None:
    """Until processes not ours have used under QUIET_SHARE of the CPUs for three
    one-second windows in a row (at most `max_s`)."""
    t0 = time.monotonic()
    wait_quiet(max_s, ours=watch, threshold=QUIET_SHARE * (os.cpu_count() or 1),
               window_s=1.0, windows=3)
    waited = time.monotonic() - t0
    if waited > 5:
        print(f"  (waited {waited:.0f} s for other processes to quieten)",
              file=sys.stderr, flush=True)


def run_cell(spec: CellSpec, sims: dict[str, Simulator], opts: Options,
             workdir: Path) -> CellResult:
    primary = sims["after-accept" if spec.mode == "after-accept" else PRIMARY]
    secondary = sims[SECONDARY]
    tag = re.sub(r"[^a-z0-9]+", "-", spec.label.lower()).strip("-")
    port = free_port()
    config = _proxy_config(spec, port, workdir / f"proxy-{tag}.db", primary, secondary)
    admin_key = secrets.token_urlsafe(24)
    proxy, _ = start_proxy(workdir, tag, config, env={"FLUX_PROXY_ADMIN_KEY": admin_key},
                           ready_path="/readyz")
    url = f"http://{HOST}:{port}"
    result = CellResult(spec)
    try:
        # auth stays on, as in production
        headers = bearer(admin_client_key(url, admin_key, "bench-failover"))
        for sim in (primary, secondary):  # creation config: error_rate 0
            sim.control("/_sim/reset", {})
        if opts.warmup:
            # Half pinned to the secondary, so its connection pool is warm too.
            warm = asyncio.run(load(url, opts.warmup, opts.concurrency, opts.request_timeout_s,
                                    opts.cell_time_limit_s, headers=headers,
                                    pin_every=2 if len(config["routing"]["order"]) > 1 else 0,
                                    offset=10_000_000))
            bad = [s.error for s in warm.results if not s.ok]
            if bad:
                raise RuntimeError(f"warm-up failed at 0% failure: {Counter(bad)}")
        watch = {"proxy": proxy.pid} | {name: sim.pid for name, sim in sims.items()}
        if opts.wait_quiet_s > 0:
            _wait_quiet(watch, opts.wait_quiet_s)
        for sim in (primary, secondary):
            sim.control("/_sim/reset", {})  # counters, jobs and fault RNG
        before = _failovers(httpx.get(url + "/metrics", timeout=10, trust_env=False).text)
        if spec.mode in MODES:
            primary.control("/_sim/config", {"error_rate": spec.rate})
        window = CpuWindow(watch)
        done = asyncio.run(load(url, opts.requests, opts.concurrency, opts.request_timeout_s,
                                opts.cell_time_limit_s, headers=headers))
        cpu = window.stop()
        result.samples, result.wall_s, result.truncated = done.results, done.wall_s, done.truncated
        proxy_cpu, other = cpu.trees["proxy"], cpu.other_s
        result.proxy_cpu_s = None if math.isnan(proxy_cpu) else proxy_cpu
        if not math.isnan(other) and done.wall_s > 0:
            result.other_load = other / (done.wall_s * (os.cpu_count() or 1))
        models = httpx.get(url + "/v1/models", headers=headers, timeout=10, trust_env=False)
        models.raise_for_status()
        result.health = _health(models.json())
        after = _failovers(httpx.get(url + "/metrics", timeout=10, trust_env=False).text)
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
    info = machine_info()
    return (f"{info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
            f"{platform.system()} {platform.release()}")


def _on_off(text: str) -> list[bool]:
    return [v == "on" for v in csv_list(str, ("on", "off"))(text)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="predictions per cell")
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=None, help="default: --concurrency")
    ap.add_argument("--rates", type=csv_list(float, required=True), default=[0.1, 0.5, 1.0],
                    help="primary failure rates (comma list)")
    ap.add_argument("--modes", type=csv_list(str, MODES), default=list(MODES))
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
    kinds = [(PRIMARY, PRIMARY, False), (SECONDARY, SECONDARY, False)]
    if "after-accept" in args.modes:
        kinds.append(("after-accept", PRIMARY, True))
    with services() as started:
        sims: dict[str, Simulator] = {}
        for name, kind, after_accept in kinds:  # started together, then waited for
            sims[name] = start_simulator(kind, args.job_latency, workdir,
                                         after_accept=after_accept, wait=False)
            started.append(sims[name])
        for sim in sims.values():
            sim.wait_healthy()
        results: list[CellResult] = []
        for spec in plan(args):
            t0 = time.monotonic()
            result = run_cell(spec, sims, opts, workdir)
            results.append(result)
            print(f"  {spec.label}: n={result.n} failures={result.failures} "
                  f"p50={ms(result.p(50), 0)} ms p99={ms(result.p(99), 0)} ms "
                  f"({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
        return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulator"]:  # the after-accept simulator, as it used to be started
        return simulators.main(argv[1:])
    args = parse_args(argv)
    started = time.monotonic()
    print(f"# {machine()}", file=sys.stderr)
    # SIGTERM unwinds through every `finally`: the children stop.
    with sigterm_raises(lambda signum: SystemExit(128 + signum)):
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            results = run(args, args.workdir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
                results = run(args, Path(tmp))
    print(report(results))
    print(f"\n{len(results)} cells, {time.monotonic() - started:.0f} s; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    if args.json is not None:
        write_json(args.json, {"machine": machine(),
                               "args": {k: str(v) for k, v in vars(args).items()},
                               "cells": [r.summary() for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
