"""Ledger audit: does the proxy's ledger match what the upstreams billed?

Processes on 127.0.0.1:

* two simulators, WaveSpeed and VibeDream, from *this checkout*
  (``python -m providers.simulators``, this checkout first on their PYTHONPATH: they
  keep the billing log, ``GET /_sim/billing``, that this audit reads);
* the proxy (``flux-proxy serve``; SQLite in a temp dir by default, ``--db postgres``
  optional), with a client key from ``flux-proxy keys create``; routing ``weighted``
  1:1 over both providers (each is the other's failover); short upstream timeouts so
  that a hang ends as an outcome-unknown attempt within seconds;
* this process: ``--requests`` random predictions (sizes from both providers' ranges,
  1-4 images, sync and async, some with a per-request fault directive) from
  ``--concurrency`` workers, while the simulators' fault knobs are toggled at random
  (5xx, 429, hang, drop, drop after accept, fail after accept, moderation, malformed,
  failed polls). Half-way through, once attempts are in flight in every crash window
  (submitting; processing on each provider; waited for up to 10 s), the proxy is
  SIGKILLed, the database is read as the kill left it, and the proxy is started again
  on the same database with the same instance id (it resumes the in-flight
  predictions). Then every fault is switched off and the audit waits (bounded) until
  every prediction is terminal.

Then it compares, per upstream task, each simulator's charge with the proxy's attempt
rows (read from its database), the same attempts as ``GET /v1/predictions``
lists them, and the totals with ``GET /v1/spend``. See ``ledger_compare.py`` for the
rules; it prints the totals side by side, the counts, every discrepancy and every
conservative charge (an ``unknown`` attempt: no upstream id, charged the expected
price by design). The exit status is 1 when there is a discrepancy.

VibeDream quotes ``--vibedream-cents`` per image (default 3), while the proxy's
fallback price (used when it has no quote) stays at its default of 2: a charge that
did not come from the quote shows up instead of matching by coincidence.

    .venv/bin/python bench/ledger_audit.py --quick        # 60 predictions, ~20 s
    .venv/bin/python bench/ledger_audit.py                # 300 predictions, ~45 s
    .venv/bin/python bench/ledger_audit.py --db postgres --json ledger.json

Every loop is bounded in count and time; the children are stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

if not __package__:  # run by path: this checkout's bench/, not one on PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness.cpu import machine_info
from bench.harness.procs import (
    HOST,
    REPO,
    STARTUP_TIMEOUT_S,
    Service,
    clean_env,
    cli,
    free_port,
    loopback,
    services,
    sigterm_raises,
)
from bench.harness.proxy import (
    add_postgres_args,
    bearer,
    cli_client_key,
    proxy_config,
    reset_postgres,
    start_proxy,
)
from bench.harness.report import write_json
from bench.harness.simulators import SIM_KEY, Simulator
from bench.ledger_compare import AttemptRow, Ledgers, PredRow, Task, compare, report
from bench.ledger_traffic import Chaos, Sent, client_counts, drive, make_bodies

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/flux_bench_ledger"
INSTANCE = "ledger-audit"
PAGE = 100
MAX_PAGES = 1000


# --------------------------------------------------------------------------- processes


class CheckoutSimulator(Simulator):
    """A simulator run from this checkout, whatever comes first on PYTHONPATH."""

    def __init__(self, kind: str, knobs: dict[str, Any], workdir: Path) -> None:
        port = free_port()
        env = clean_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", "providers.simulators", kind, "--host", HOST,
                "--port", str(port), "--config", json.dumps(knobs)]
        Service.__init__(self, kind, argv, workdir / f"{kind}.log", env=env, cwd=REPO)
        self.port, self.url = port, f"http://{HOST}:{port}"


def sim_knobs(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    knobs: dict[str, Any] = {"api_key": SIM_KEY, "job_latency_s": 0.2, "retry_after_s": 0.2,
                             "hang_s": 30.0, "sync_give_up_s": 2.0,
                             "rng_seed": args.seed + (1 if kind == "vibedream" else 2)}
    if kind == "vibedream":
        knobs["cost_cents"] = args.vibedream_cents
    return knobs


def make_config(port: int, db_url: str, sims: dict[str, Simulator]) -> dict[str, Any]:
    def provider(sim: Simulator, **extra: Any) -> dict[str, Any]:
        return {"base_url": sim.url, "connect_timeout_s": 1.0, "read_timeout_s": 1.5,
                "total_timeout_s": 5.0, "deadline_s": 20.0, "poll_initial_s": 0.05,
                "poll_max_s": 0.5, "asset_hosts": [f"{HOST}:{sim.port}"],
                "allow_private_asset_hosts": True, **extra}

    config = proxy_config(
        port, db_url, instance_id=INSTANCE, order=["wavespeed", "vibedream"],
        sync_timeout_s=30.0,
        routing={"default_retry_after_s": 0.2,
                 "breaker": {"failure_threshold": 5, "cooldown_s": 1.0},
                 "routes": {"flux-dev": {"strategy": "weighted",
                                         "weights": {"wavespeed": 1, "vibedream": 1}}}},
        providers={"wavespeed": provider(sims["wavespeed"], sync_read_timeout_s=3.0),
                   "vibedream": provider(sims["vibedream"])})
    return config | {"prediction_deadline_s": 60.0, "lease_s": 6.0}


def sigkill(proxy: Service) -> None:
    """SIGKILL to the proxy's whole process group: no shutdown code runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proxy.pid, signal.SIGKILL)
    proxy.proc.wait(10)
    proxy.stop()  # closes its log


async def restart(workdir: Path, env: dict[str, str], ready_url: str) -> Service:
    """The proxy again, same config file and database (``env``: the first one's).

    Started from the event loop's thread, not a worker thread: PR_SET_PDEATHSIG fires
    when the *thread* that forked the child ends, and `asyncio.to_thread`'s do."""
    proxy = Service("proxy[2]", [*cli(), "serve"], workdir / "proxy-2.log", env=env)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proxy.proc.poll() is not None:
                raise RuntimeError(f"the restarted proxy exited:\n{proxy.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(loopback(ready_url))).status_code == 200:
                    return proxy
            await asyncio.sleep(0.1)
    proxy.stop()
    raise RuntimeError(f"the restarted proxy was not ready in {STARTUP_TIMEOUT_S:.0f} s")


# --------------------------------------------------------------------------- reading


_PREDS = "SELECT id, status, request, cost_micro_usd FROM predictions"
_ATTEMPTS = ("SELECT prediction_id, seq, provider, upstream_id, status, cost_micro_usd, "
             "error_kind, error FROM attempts ORDER BY prediction_id, seq")


async def read_db(url: str, *, active_only: bool = False) -> list[PredRow]:
    """Every prediction (``active_only``: the non-terminal ones) and its attempts, read
    straight from the proxy's tables: plain SQL over columns every version has, so it
    reads a database written by any proxy version (an exported commit, say)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            where = " WHERE status IN ('queued', 'processing')" if active_only else ""
            preds = (await conn.execute(text(_PREDS + where))).all()
            rows = (await conn.execute(text(_ATTEMPTS))).all()
    finally:
        await engine.dispose()
    attempts: dict[str, list[AttemptRow]] = {}
    for pid, seq, provider, upstream_id, status, cost, kind, error in rows:
        attempts.setdefault(pid, []).append(
            AttemptRow(pid, int(seq), provider, upstream_id, status, int(cost), kind, error))
    out = []
    for pid, status, request, cost in preds:
        req = json.loads(request) if isinstance(request, str | bytes) else dict(request)
        out.append(PredRow(pid, status, str(req.get("prompt")), int(req.get("num_images", 1)),
                           int(cost), attempts.get(pid, [])))
    return out


async def wait_busy(url: str, want: int, limit_s: float) -> dict[str, int]:
    """Until the attempts in flight cover every crash window that matters: at least
    ``want`` in flight, one of them still submitting (row written, no upstream id yet)
    and one processing (upstream id recorded, not ended) on each provider; at most
    ``limit_s``. What was in flight, by provider and status."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    deadline = time.monotonic() + limit_s
    busy: dict[str, int] = {}
    try:
        while time.monotonic() < deadline:
            async with engine.connect() as conn:
                rows = (await conn.execute(text(
                    "SELECT provider, status, count(*) FROM attempts WHERE status IN "
                    "('submitting', 'processing') GROUP BY provider, status"))).all()
            busy = {f"{p} {st}": int(n) for p, st, n in rows}
            covered = {f"{p} processing" for p in ("wavespeed", "vibedream")} <= set(busy)
            submitting = any(k.endswith("submitting") for k in busy)
            if sum(busy.values()) >= want and covered and submitting:
                break
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
    return busy


def get_json(client: httpx.Client, path: str, **params: Any) -> dict[str, Any]:
    r = client.get(path, params=params)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def api_predictions(client: httpx.Client, status: str | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": PAGE} | ({"status": status} if status else {})
    for _ in range(MAX_PAGES):
        page = get_json(client, "/v1/predictions", **params)
        out += page["data"]
        if not page.get("next_cursor"):
            break
        params["cursor"] = page["next_cursor"]
    return out


def wait_settled(client: httpx.Client, sims: dict[str, Simulator], limit_s: float) -> bool:
    """Until no prediction is queued or processing and every simulator task has ended
    (at most ``limit_s``)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        active = sum(len(get_json(client, "/v1/predictions", status=s, limit=1)["data"])
                     for s in ("queued", "processing"))
        pending = sum(not t["final"] for sim in sims.values()
                      for t in sim.control("/_sim/billing")["tasks"])
        if not active and not pending:
            return True
        time.sleep(0.5)
    return False


def spend_by_provider(client: httpx.Client) -> dict[str, int]:
    body = get_json(client, "/v1/spend", group_by="provider")
    out = {str(row["group"]): int(row["cost_micro_usd"]) for row in body["data"]}
    return out | {"total": int(body["total"]["cost_micro_usd"])}


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, workdir: Path) -> tuple[str, dict[str, Any], bool]:
    if args.db == "postgres":
        asyncio.run(reset_postgres(args.pg_url, force=args.pg_force))
        db_url = args.pg_url
    else:
        db_url = f"sqlite+aiosqlite:///{workdir / 'ledger.db'}"
    rng = random.Random(args.seed)
    tag = f"{args.seed}-{secrets.token_hex(3)}"
    admin = secrets.token_urlsafe(24)
    with services() as started:
        sims: dict[str, Simulator] = {}
        for kind in ("wavespeed", "vibedream"):
            sims[kind] = CheckoutSimulator(kind, sim_knobs(args, kind), workdir)
            started.append(sims[kind])
        for sim in sims.values():
            sim.wait_healthy()
        port = free_port()
        config = make_config(port, db_url, sims)
        proxy, env = start_proxy(workdir, "1", config, env={"FLUX_PROXY_ADMIN_KEY": admin},
                                 ready_path="/readyz")
        started.append(proxy)
        key = cli_client_key(env, "ledger-audit")
        url = f"http://{HOST}:{port}"
        at_kill: dict[tuple[str, int], str] = {}
        preds_at_kill: dict[str, str] = {}
        kill_info: dict[str, Any] = {}

        async def kill() -> None:
            busy = await wait_busy(db_url, args.kill_busy, 10.0)
            t0 = time.monotonic()
            sigkill(started[-1])
            snap = await read_db(db_url, active_only=True)
            for p in snap:
                preds_at_kill[p.id] = p.status
                at_kill.update({(a.prediction_id, a.seq): a.status for a in p.attempts})
            started.append(await restart(workdir, env, f"{url}/readyz"))
            kill_info.update(down_s=round(time.monotonic() - t0, 2), active=len(snap),
                             busy_before=busy,
                             attempts=dict(sorted(Counter(at_kill.values()).items())))
            print(f"  SIGKILL: {len(snap)} predictions active, attempts {kill_info['attempts']};"
                  f" back in {kill_info['down_s']} s", file=sys.stderr, flush=True)

        bodies = make_bodies(args.requests, tag, rng)
        chaos = Chaos({k: s.url for k, s in sims.items()}, random.Random(args.seed + 7))
        t0 = time.monotonic()
        records = asyncio.run(drive(
            url, bearer(key), bodies, concurrency=args.concurrency,
            request_timeout_s=90.0, time_limit_s=args.time_limit, chaos=chaos,
            kill_at=max(1, args.requests // 2) if args.kill else args.requests + 1,
            kill=kill))
        traffic_s = time.monotonic() - t0
        print(f"  traffic: {len(records)} predictions in {traffic_s:.0f} s; settling",
              file=sys.stderr, flush=True)
        with httpx.Client(base_url=url, headers=bearer(admin), timeout=30,
                          trust_env=False) as api:
            settled = wait_settled(api, sims, args.settle_time)
            led = collect(api, sims, db_url, records, at_kill, preds_at_kill)
    res = compare(led)
    counts = client_counts(records)
    in_db = {p.prompt for p in led.preds}
    lost = [r for r in records if r.outcome.startswith("lost")]
    counts["lost answer, prediction in the db"] = sum(r.prompt in in_db for r in lost)
    counts["lost answer, no prediction"] = sum(r.prompt not in in_db for r in lost)
    text = report(res, counts, verbose=args.verbose)
    faults = ", ".join(f"{k} {v}" for k, v in sorted(chaos.toggles.items()))
    killed = "none" if not kill_info else (
        f"{kill_info['active']} predictions active, attempts {kill_info['attempts']} "
        f"(in flight just before: {kill_info['busy_before']}); back in "
        f"{kill_info['down_s']} s")
    header = [f"# Ledger audit: {len(records)} predictions, seed {args.seed}, db {args.db}",
              "", f"- traffic {traffic_s:.0f} s, {args.concurrency} at a time",
              f"- SIGKILL of the proxy: {killed}",
              f"- fault windows toggled: {faults}",
              f"- settled: {'yes' if settled else 'NO (time limit)'}", ""]
    data = {"args": {k: str(v) for k, v in vars(args).items()}, "kill": kill_info,
            "faults": dict(chaos.toggles), "client": counts, "settled": settled,
            "traffic_s": traffic_s, **res.as_dict(),
            "requests": [vars(r) for r in records]}
    return "\n".join(header) + text, data, bool(res.discrepancies) or not settled


def collect(api: httpx.Client, sims: dict[str, Simulator], db_url: str, records: list[Sent],
            at_kill: dict[tuple[str, int], str], preds_at_kill: dict[str, str]) -> Ledgers:
    tasks = [Task.from_log(kind, t) for kind, sim in sims.items()
             for t in sim.control("/_sim/billing")["tasks"]]
    listed = api_predictions(api)
    return Ledgers(
        tasks=tasks, preds=asyncio.run(read_db(db_url)),
        api={p["id"]: [(a["provider"], a["upstream_id"], a["status"], int(a["cost_micro_usd"]))
                       for a in p["attempts"]] for p in listed},
        api_costs={p["id"]: int(p["cost_micro_usd"]) for p in listed},
        spend=spend_by_provider(api),
        answered_ids={r.prediction_id for r in records if r.prediction_id},
        at_kill=at_kill, preds_at_kill=preds_at_kill)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/ledger_audit.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1, help="traffic and fault RNG seed")
    ap.add_argument("--quick", action="store_true", help="~60 predictions")
    ap.add_argument("--no-kill", dest="kill", action="store_false",
                    help="skip the SIGKILL of the proxy")
    ap.add_argument("--kill-busy", type=int, default=4, metavar="N",
                    help="SIGKILL once N attempts are in flight, one submitting and one "
                    "processing on each provider (waits up to 10 s for it)")
    ap.add_argument("--verbose", action="store_true",
                    help="list every conservative charge, not only those with a task")
    ap.add_argument("--vibedream-cents", type=int, default=3,
                    help="VibeDream's quoted costCents per image (the proxy's fallback is 2)")
    ap.add_argument("--time-limit", type=float, default=600.0,
                    help="no new prediction starts after this many seconds")
    ap.add_argument("--settle-time", type=float, default=180.0,
                    help="how long to wait for every prediction to be terminal")
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    add_postgres_args(ap, DEFAULT_PG_URL)
    ap.add_argument("--json", type=Path, default=None, help="write every finding here")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep configs, the database and logs here (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 60)
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 256:
        ap.error("--requests 1..100000, --concurrency 1..256")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    started = time.monotonic()
    with sigterm_raises(lambda signum: SystemExit(128 + signum)):
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            text, data, failed = run(args, args.workdir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
                text, data, failed = run(args, Path(tmp))
    print(text)
    print(f"\n{time.monotonic() - started:.0f} s; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
          f"{info['nproc']} CPUs, Python {info['python']}")
    if args.json is not None:
        write_json(args.json, data)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
