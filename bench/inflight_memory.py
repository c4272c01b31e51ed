"""Memory per prediction in flight: what the lifecycle holds while a job is polled.

Fully in-process, nothing on the network: a PredictionService (as tests/lifecycle
builds it) over a provider whose jobs stay `processing` (it keeps nothing per job and
answers each poll with a fresh UpstreamJob, as an HTTP adapter does), wrapped in
InstrumentedProvider as the app wraps its adapters, on SQLite (a temp file, the real
Store) or the in-memory store. Async predictions are submitted in steps up to each
of ``--counts``; after each step the loop waits a poll period so every prediction has
polled and sits in its sleep, then reads RSS (VmRSS), the live objects by type and
the bytes per prediction in flight (the RSS slope between steps).

A second child process, with tracemalloc on (it slows and inflates memory, so never
in the RSS run), submits ``--trace-count`` and reports the top allocation sites of
what is still held, by file:line and by traceback.

``--tree DIR`` runs the children on another checkout (e.g. ``git archive HEAD | tar
-x -C /tmp/snapM``), so one run compares before and after:

    .venv/bin/python -m bench.inflight_memory --tree /tmp/snapM --tree .
    .venv/bin/python -m bench.inflight_memory --counts 1000,2000 --store memory

Bounded: each child by ``--max-time``; every loop by count.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_FAST_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None  # no fsync cost per commit


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _objects() -> Counter[str]:
    return Counter(type(o).__name__ for o in gc.get_objects())


# --------------------------------------------------------------------------- the child


async def _child(args: argparse.Namespace) -> dict[str, Any]:
    import tracemalloc

    from pydantic import SecretStr

    from common.logging import configure_logging
    from providers.base import (
        BaseProvider,
        Capabilities,
        GenerationRequest,
        JobStatus,
        ProviderSettings,
        UpstreamJob,
    )
    from proxy.lifecycle.service import PredictionService
    from proxy.routing import Router, RoutingSettings
    from proxy.routing.instrumented import InstrumentedProvider
    from proxy.schema import GenerateRequest

    configure_logging("warning", "json")  # the proxy's format; info lines would flood

    class LongJobs(BaseProvider):
        """Every job stays processing; no state per job (the upstream holds it)."""

        def __init__(self) -> None:
            self.name = "long"
            self.capabilities = Capabilities(cancel=True)
            self.settings = ProviderSettings.model_validate({
                "base_url": "http://long.invalid", "api_key": SecretStr("x"),
                "poll_initial_s": args.poll_s, "poll_max_s": args.poll_s,
                "poll_multiplier": 1.0, "deadline_s": 3600.0})
            self.ids = 0
            self.polls = 0

        async def submit(self, req: GenerationRequest) -> UpstreamJob:
            self.ids += 1
            uid = f"job-{self.ids:08d}"
            return UpstreamJob(uid, JobStatus.PROCESSING, poll_url=f"http://long.invalid/{uid}",
                               charged_micro_usd=25_000, raw_status="queued")

        async def poll(self, job: UpstreamJob) -> UpstreamJob:
            self.polls += 1
            return UpstreamJob(job.upstream_id, JobStatus.PROCESSING, poll_url=job.poll_url,
                               charged_micro_usd=job.charged_micro_usd, raw_status="processing")

        async def cancel(self, job: UpstreamJob) -> bool:
            return True

        def attempt_cost_micro_usd(self, req: GenerationRequest, job: UpstreamJob | None) -> int:
            return 25_000

    inner = LongJobs()
    provider = InstrumentedProvider(inner)
    folder = tempfile.mkdtemp(prefix="inflight-mem-", dir=_FAST_DIR)
    store: Any
    if args.store == "sqlite":
        from proxy.store import Store
        store = Store(f"sqlite+aiosqlite:///{folder}/mem.db")
        await store.upgrade()
    else:
        from proxy.store.memory import MemoryStore
        store = MemoryStore()
    settings = RoutingSettings.model_validate({"order": ["long"]})
    router = Router({"long": provider}, settings)
    service = PredictionService(store, router, instance_id="mem-1",
                                prediction_deadline_s=7200.0)
    await service.start()
    req = GenerateRequest.model_validate({"prompt": "a lighthouse at dusk, " * 8, "seed": 7,
                                          "size": "1024*1024"})
    counts = [int(c) for c in args.counts.split(",")]
    if args.trace:
        tracemalloc.start(args.trace_depth)
    gc.collect()
    # A first few to warm every code path (imports, caches, pools) before the baseline.
    for _ in range(20):
        await service.submit(req)
    await asyncio.sleep(args.poll_s * 1.5)
    gc.collect()
    base_rss, base_objs = _rss(), _objects()
    base_snap = tracemalloc.take_snapshot() if args.trace else None
    steps: list[dict[str, Any]] = []
    submitted = 20
    prev_rss, prev_n = base_rss, 0
    started = time.monotonic()
    for target in counts:
        while submitted - 20 < target:
            await service.submit(req)
            submitted += 1
            if submitted % 200 == 0:
                await asyncio.sleep(0)  # let the runners reach their first wait
        polls_before = inner.polls
        await asyncio.sleep(args.poll_s * 2.2)  # everyone has polled at least once
        cpu0, polls0 = time.process_time(), inner.polls
        await asyncio.sleep(args.poll_s * 2)  # a steady window: CPU per poll
        cpu_s, polls_n = time.process_time() - cpu0, inner.polls - polls0
        gc.collect()
        rss = _rss()
        in_flight = len(service._runs) - 20
        steps.append({
            "in_flight": in_flight, "rss_mib": round(rss / 2**20, 1),
            "delta_mib": round((rss - base_rss) / 2**20, 1),
            "bytes_per_pred": round((rss - base_rss) / max(1, in_flight)),
            "slope_bytes_per_pred": round((rss - prev_rss) / max(1, in_flight - prev_n)),
            "polled": inner.polls - polls_before,
            "cpu_us_per_poll": round(cpu_s / max(1, polls_n) * 1e6, 1),
        })
        print(json.dumps(steps[-1]), file=sys.stderr, flush=True)
        prev_rss, prev_n = rss, in_flight
        if time.monotonic() - started > args.max_time:
            break
    n = steps[-1]["in_flight"]
    objs = _objects() - base_objs
    per_pred = {k: round(v / n, 2) for k, v in objs.most_common(25) if v / n >= 0.5}
    out: dict[str, Any] = {"steps": steps, "objects_per_pred": per_pred,
                           "store": args.store, "poll_s": args.poll_s}
    if base_snap is not None:
        snap = tracemalloc.take_snapshot()
        filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
        snap, base_snap = snap.filter_traces(filters), base_snap.filter_traces(filters)
        lines = snap.compare_to(base_snap, "lineno")
        out["by_line"] = [
            {"site": f"{_short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
             "bytes_per_pred": round(s.size_diff / n), "blocks_per_pred": round(
                 s.count_diff / n, 2)}
            for s in lines[:args.top]]
        tb = snap.compare_to(base_snap, "traceback")
        out["by_traceback"] = [
            {"bytes_per_pred": round(s.size_diff / n),
             "stack": [f"{_short(f.filename)}:{f.lineno}" for f in list(s.traceback)[-8:]]}
            for s in tb[:args.top_tb]]
        out["traced_bytes_per_pred"] = round(sum(s.size_diff for s in lines) / n)
    await service.stop()
    await router_close(router)
    if args.store == "sqlite":
        await store.dispose()
    shutil.rmtree(folder, ignore_errors=True)
    return out


async def router_close(router: Any) -> None:
    close = getattr(router, "aclose", None)
    if close is not None:
        await close()


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    for part in ("proxy/", "providers/", "common/", "bench/"):
        idx = path.rfind("/" + part)
        if idx >= 0:
            return path[idx + 1:]
    return path


# --------------------------------------------------------------------------- the driver


def _run_child(tree: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree), INFLIGHT_MEMORY_TREE=str(tree))
    proc = subprocess.run(  # our own interpreter and script
        [sys.executable, str(Path(__file__).resolve()), "--child", *extra],
        env=env, cwd=tree, capture_output=True, text=True, timeout=timeout, check=False)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}) on {tree}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,2000,5000,10000")
    parser.add_argument("--trace-count", type=int, default=1000)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--poll-s", type=float, default=4.0)
    parser.add_argument("--tree", action="append", type=Path,
                        help="checkout(s) to measure, in order (default: this one)")
    parser.add_argument("--max-time", type=float, default=240.0)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--top-tb", type=int, default=8)
    parser.add_argument("--trace-depth", type=int, default=12)
    parser.add_argument("--no-trace", action="store_true")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args))))
        return
    common = ["--store", args.store, "--poll-s", str(args.poll_s), "--max-time",
              str(args.max_time), "--top", str(args.top), "--top-tb", str(args.top_tb),
              "--trace-depth", str(args.trace_depth)]
    results: dict[str, Any] = {}
    for tree in args.tree or [ROOT]:
        tree = tree.resolve()
        print(f"== {tree}: RSS run", file=sys.stderr, flush=True)
        rss = _run_child(tree, [*common, "--counts", args.counts], args.max_time + 120)
        entry: dict[str, Any] = {"rss": rss}
        if not args.no_trace:
            print(f"== {tree}: tracemalloc run", file=sys.stderr, flush=True)
            # Slower polls: tracemalloc makes each one ~20x dearer.
            slow = [*common, "--poll-s", str(max(args.poll_s, 10.0))]
            entry["trace"] = _run_child(
                tree, [*slow, "--counts", str(args.trace_count), "--trace"],
                args.max_time + 120)
        results[str(tree)] = entry
        _report(str(tree), entry)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _report(tree: str, entry: dict[str, Any]) -> None:
    print(f"\n### {tree}\n")
    print("| in flight | RSS MiB | over baseline MiB | bytes/pred | slope bytes/pred "
          "| CPU µs/poll |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in entry["rss"]["steps"]:
        print(f"| {s['in_flight']} | {s['rss_mib']} | {s['delta_mib']} | {s['bytes_per_pred']} "
              f"| {s['slope_bytes_per_pred']} | {s['cpu_us_per_poll']} |")
    print("\nobjects per prediction:", json.dumps(entry["rss"]["objects_per_pred"]))
    trace = entry.get("trace")
    if trace:
        print(f"\ntraced bytes/pred: {trace['traced_bytes_per_pred']}\n")
        for row in trace["by_line"]:
            print(f"  {row['bytes_per_pred']:>7} B {row['blocks_per_pred']:>6} blk  {row['site']}")
        print()
        for row in trace["by_traceback"]:
            print(f"  {row['bytes_per_pred']:>7} B  " + " <- ".join(reversed(row["stack"])))
    sys.stdout.flush()


if __name__ == "__main__":
    if "INFLIGHT_MEMORY_TREE" in os.environ:  # a child: the tree asked for, not bench/'s
        sys.path.insert(0, os.environ["INFLIGHT_MEMORY_TREE"])
    elif not __package__:
        sys.path.insert(0, str(ROOT))
    main()
