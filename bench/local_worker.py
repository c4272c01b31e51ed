"""What the local worker adds around the FLUX pipeline call: queue, batching, HTTP, polling.

For each batch size B (``--batches``, default 1,2,4) three rows:

* ``engine``: ``FluxEngine.run`` called in this process with B compatible one-image
  jobs: the bare pipeline call (text encoders, denoising, VAE decode, PIL), one call
  per round, ``--rounds`` rounds after ``--warmup-rounds`` untimed ones. Interleaved
  (``--pairing``; the default unless that would put two copies of the model on a GPU):
  each engine round runs beside a worker round, in alternating order, while the worker
  is idle, so both layers see the same machine (shared machines drift by tens of
  percent between minutes); sequential: all engine rounds first.
* ``worker``: the same B jobs through the worker over HTTP (closed loop, one batch in
  flight): the worker is started with ``max_batch_size`` = B; each round POSTs B jobs
  concurrently to ``/v1/jobs``, polls each ``GET /v1/jobs/{id}`` every
  ``--poll-interval`` seconds (default 0.05, where the proxy's ``local`` provider
  starts) until it is terminal, then downloads its image. A job's latency runs from its
  POST to its image downloaded; a round's wall time from the first POST to the last
  image. ``batch.size`` (from the job's info) shows whether the B jobs really shared one
  pipeline call.
* ``worker backlog``: B x ``--rounds`` jobs submitted at once to the same worker, so
  the queue is never empty: steady-state images/s, from the first POST to the last
  job's ``finished_at`` (the worker's clock; same host). Only the last job is polled.

``overhead`` is per batch: the worker's p50 round wall time minus the engine's p50 call
(for the backlog row: its wall time per batch minus the engine's p50 call). The
breakdown table splits a worker job's latency with the worker's own timestamps: POST
round trip, queue wait (until its batch started), the pipeline call as the worker timed
it, encoding and bookkeeping after the call, the delay until a poll saw it finished
(about half the poll interval plus one GET), and the image download.

Models (one of):

* ``--tiny`` (default): ``worker.engine.tiny.build_tiny_flux`` in a temp folder, CPU,
  fp32, 128x128, 4 steps: a random FLUX in the real layout, whose pipeline call costs
  ~50 ms, so the fixed costs of the worker are visible.
* ``--model PATH``: a real FLUX.1 [dev] folder (diffusers layout), loaded with
  ``FluxEngine.load`` in this process and by ``flux-proxy worker`` in a subprocess.
* ``--random-full``: the full-size FLUX.1-dev architecture (12B transformer, T5-XXL,
  CLIP-L, the 16-channel VAE) with random weights, built directly on the GPU in
  bf16/fp16 (nothing saved, nothing downloaded; the tokenizers are built in code as in
  ``tiny``). CUDA only. It is wrapped in a ``FluxEngine`` the way ``FluxEngine.load``
  does it and served by the worker app *in this process* (``--worker inprocess``), since
  a subprocess cannot share the in-memory weights (saving them would write ~34 GB).

The worker runs as ``flux-proxy worker`` in a subprocess (``--worker subprocess``, the
default except for ``--random-full``: HTTP and process boundaries as deployed) or as the
same app under uvicorn in a thread of this process (``--worker inprocess``: no second
model copy, no reload per batch size; client and worker then share the GIL). With
``--worker subprocess`` on a GPU the in-process engine is freed before the workers
start (sequential pairing), so the GPU holds one copy of the model at a time; each
batch size starts a fresh worker (load, warm-up), whose start-up time is reported.

    .venv/bin/python -m bench.local_worker                  # tiny on CPU (~1-2 min)
    .venv/bin/python -m bench.local_worker --quick          # smoke run (< 1 min)
    .venv/bin/python -m bench.local_worker --model /models/FLUX.1-dev --device cuda \\
        --dtype bf16 --size 1024 --steps 28 --speed tf32,compile
    .venv/bin/python -m bench.local_worker --random-full --device cuda --speed auto

Everything is on 127.0.0.1. Every loop is bounded by a count and a time limit; the
script always stops the worker it started and removes its temp folder.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

if not __package__:  # run by path: this checkout's bench/, not one on PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness.cpu import machine_info, wait_quiet
from bench.harness.procs import copy_logs, sigterm_raises
from bench.harness.report import csv_list, load_notes, ms, percentile, render_table, write_json
from bench.local_fluxdev import SetupError
from bench.local_layers import Cell, JobSample, Plan, measure_engine, measure_worker
from bench.local_setup import (
    SPEED_NAMES,
    Setup,
    free_engine,
    load_engine,
    make_setup,
    worker_server,
)

MAX_ROUNDS = 200
MAIN_HEADERS = ["layer", "batch", "rounds", "images", "p50 ms", "p99 ms", "images/s",
                "batch.size seen", "overhead/batch ms", "overhead %", "CPU ms/img", "errors"]
PARTS_HEADERS = ["batch", "job", "POST", "queue", "pipeline (worker)", "pipeline (engine)",
                 "encode+rest", "poll notice", "image GET", "client CPU ms/img",
                 "worker start s"]


# --------------------------------------------------------------------------- report


def _sizes(sizes: Sequence[int]) -> str:
    if not sizes:
        return "-"
    counts = Counter(sizes)
    if len(counts) == 1:
        return f"{sizes[0]} (all)"
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items(), reverse=True))


def render(cells: Sequence[Cell]) -> str:
    engine = {c.batch: c for c in cells if c.layer == "engine"}
    main_rows, parts_rows = [], []
    for cell in cells:
        base = engine.get(cell.batch)
        over = "-"
        pct = "-"
        if base is not None and cell.layer != "engine" and base.rounds and cell.images:
            per_batch = (cell.round_p50() if cell.layer == "worker"
                         else cell.wall_s / (cell.images / cell.batch))
            extra = per_batch - base.round_p50()
            over, pct = ms(extra), f"{100 * extra / base.round_p50():.0f}%"
        cpu = "-" if cell.cpu_s is None or not cell.images else \
            f"{cell.cpu_s / cell.images * 1000:.0f}"
        backlog = cell.layer == "worker backlog"
        errors = str(cell.errors) + (" (cut)" if cell.truncated else "")
        main_rows.append([
            cell.layer, str(cell.batch), "-" if backlog else str(cell.rounds), str(cell.images),
            "-" if backlog else ms(cell.p(50)), "-" if backlog else ms(cell.p(99)),
            f"{cell.ips:.2f}", _sizes(cell.batch_sizes), over, pct, cpu, errors,
        ])
        if cell.jobs:
            def p50(name: str, jobs: list[JobSample] = cell.jobs) -> str:
                return ms(percentile([getattr(j, name) for j in jobs], 50))

            client = "-" if cell.client_cpu_s is None else \
                f"{cell.client_cpu_s / cell.images * 1000:.0f}"
            parts_rows.append([
                str(cell.batch), p50("latency_s"), p50("submit_s"), p50("queue_s"),
                p50("inference_s"), ms(base.round_p50()) if base else "-",
                ms(percentile([j.run_s - j.inference_s for j in cell.jobs], 50)),
                p50("notice_s"), p50("fetch_s"), client,
                "-" if cell.startup_s is None else f"{cell.startup_s:.1f}",
            ])
    out = [render_table(MAIN_HEADERS, main_rows)]
    if parts_rows:
        out += ["", "worker job latency, p50 of each part (ms):", "",
                render_table(PARTS_HEADERS, parts_rows)]
    out += load_notes((f"{c.layer} b={c.batch}", c.other_load()) for c in cells)
    return "\n".join(out)


# --------------------------------------------------------------------------- driver


def run(args: argparse.Namespace, plan: Plan, log: Callable[[str], None]
        ) -> tuple[Setup, list[Cell]]:
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet, log)
    setup = make_setup(args)
    layers, subprocess = set(args.layers), setup.worker_mode == "subprocess"
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="flux-bench-local-") as tmp:
        workdir = Path(tmp)
        if setup.source == "tiny":
            from worker.engine.tiny import build_tiny_flux

            setup.model = build_tiny_flux(workdir / "tiny-flux")
        engine: Any = None
        try:
            if "engine" in layers or not subprocess:
                engine = load_engine(setup, log)
            if "engine" in layers and setup.pairing == "sequential":
                log("engine layer")
                for batch in plan.batches:
                    cells.append(measure_engine(engine, batch, plan, log))
            if "worker" in layers:
                if subprocess and setup.pairing == "sequential":
                    engine = None  # one copy of the model at a time (GPU memory)
                    free_engine(setup.device)
                log(f"worker layer ({setup.worker_mode}, {setup.pairing})")
                for batch in plan.batches:
                    cells += _worker_cells(setup, engine, batch, plan, workdir, log)
        finally:
            engine = None
            free_engine(setup.device)
            if args.keep_logs:
                copy_logs(workdir, args.keep_logs)
    order = {"engine": 0, "worker": 1, "worker backlog": 2}
    cells.sort(key=lambda c: (c.batch, order[c.layer]))
    return setup, cells


def _worker_cells(setup: Setup, engine: Any, batch: int, plan: Plan, workdir: Path,
                  log: Callable[[str], None]) -> list[Cell]:
    """Start a worker with max_batch_size=batch, measure it (and, interleaved, the
    engine), stop it."""
    paired = engine if setup.pairing == "interleave" else None
    with worker_server(setup, engine, batch, plan, workdir) as (base_url, pid, startup_s):
        health = httpx.get(f"{base_url}/health", timeout=10.0, trust_env=False).json()
        log(f"  worker b={batch} up in {startup_s:.1f} s: max_batch_size "
            f"{health.get('max_batch_size')}, device {health.get('device')}")
        if health.get("max_batch_size") != batch:
            raise SetupError(f"the worker reports max_batch_size {health.get('max_batch_size')}")
        cells = asyncio.run(measure_worker(base_url, batch, plan, pid, paired, log))
    for cell in cells:
        cell.startup_s = startup_s if cell.layer == "worker" else None
    return cells


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Plan]:
    ap = argparse.ArgumentParser(
        prog="python -m bench.local_worker",
        description="Images/s and latency of the local FLUX worker: the engine alone vs "
        "the worker over HTTP, at several batch sizes.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--tiny", action="store_true",
                     help="the tiny random FLUX (default; CPU-sized)")
    src.add_argument("--model", type=Path, help="a FLUX.1 [dev] folder (diffusers layout)")
    src.add_argument("--random-full", action="store_true",
                     help="full-size FLUX.1-dev architecture, random weights, built on the "
                     "GPU (CUDA, bf16/fp16, ~40 GiB free)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cuda when torch sees a GPU (pick one with CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                    help="auto: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--size", type=_size, default=None,
                    help="WxH or N (default 128 for --tiny, else 1024)")
    ap.add_argument("--steps", type=int, default=None,
                    help="denoising steps (default 4 for --tiny, else 28)")
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--batches", type=csv_list(int), default=[1, 2, 4],
                    help="comma-separated batch sizes (default 1,2,4)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="measured rounds per cell (default 40 for --tiny, else 5)")
    ap.add_argument("--warmup-rounds", type=int, default=None,
                    help="untimed rounds first (default 3 for --tiny, else 2)")
    ap.add_argument("--layers", type=csv_list(str), default=["engine", "worker"],
                    help="comma-separated: engine, worker (default both)")
    ap.add_argument("--worker", choices=["auto", "subprocess", "inprocess"], default="auto",
                    help="how the worker runs (auto: subprocess; inprocess for --random-full)")
    ap.add_argument("--pairing", choices=["auto", "interleave", "sequential"], default="auto",
                    help="interleave: an engine round beside each worker round, in "
                    "alternating order (both layers see the same machine state; needs the "
                    "model twice in memory with --worker subprocess); sequential: all engine "
                    "rounds first, then the engine is freed. auto: sequential only for "
                    "--worker subprocess on a GPU")
    ap.add_argument("--no-backlog", dest="backlog", action="store_false",
                    help="skip the backlog rows")
    ap.add_argument("--speed", type=csv_list(str), default=[],
                    help=f"comma-separated speed options: {', '.join(SPEED_NAMES)}, or auto")
    ap.add_argument("--poll-interval", type=float, default=0.05,
                    help="seconds between a job's polls (default 0.05: the proxy's local "
                    "provider's first poll interval)")
    ap.add_argument("--batch-window-ms", type=float, default=20.0,
                    help="the worker's batch_window_ms (default 20, the worker's default)")
    ap.add_argument("--op-timeout", type=float, default=None,
                    help="seconds one round may take (default 60 for --tiny, else 600)")
    ap.add_argument("--cell-timeout", type=float, default=300.0,
                    help="no new round starts in a cell after this many seconds")
    ap.add_argument("--startup-timeout", type=float, default=None,
                    help="seconds a worker may take to load and warm up (default 120 for "
                    "--tiny, else 900)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 3 rounds, 1 warm-up round, 30 s per cell")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="first wait up to S seconds for the CPUs to be idle")
    ap.add_argument("--json", type=Path, help="write every figure (and the machine) here")
    ap.add_argument("--keep-logs", type=Path, help="copy the workers' logs here")
    args = ap.parse_args(argv)
    tiny = not (args.model or args.random_full)
    if args.model is not None and not args.model.is_dir():
        ap.error(f"--model {args.model}: not a folder")
    rounds = args.rounds or (40 if tiny else 5)
    warmup = args.warmup_rounds if args.warmup_rounds is not None else (3 if tiny else 2)
    cell_timeout = args.cell_timeout
    if args.quick:
        rounds, warmup, cell_timeout = min(rounds, 3), min(warmup, 1), min(cell_timeout, 30.0)
    size = args.size or ((128, 128) if tiny else (1024, 1024))
    bad = [x for x in args.speed if x not in (*SPEED_NAMES, "auto")]
    bad += [x for x in args.layers if x not in ("engine", "worker")]
    if bad:
        ap.error(f"unknown speed option / layer: {', '.join(bad)}")
    if not args.batches or any(not 1 <= b <= 4 for b in args.batches):
        ap.error("batch sizes must be 1..4 (one-image jobs; the worker's max_batch_size)")
    if not 1 <= rounds <= MAX_ROUNDS or warmup < 0:
        ap.error(f"rounds must be 1..{MAX_ROUNDS}, warm-up rounds >= 0")
    if not all(64 <= s <= 1536 for s in size):
        ap.error("size sides must be 64..1536 (the worker's limits)")
    steps = args.steps or (4 if tiny else 28)
    if not 1 <= steps <= 50:
        ap.error("steps must be 1..50 (the worker's limit)")
    if args.poll_interval <= 0:
        ap.error("--poll-interval must be positive")
    plan = Plan(size=size, steps=steps, guidance=args.guidance, batches=args.batches,
                rounds=rounds, warmup_rounds=warmup, poll_interval_s=args.poll_interval,
                batch_window_ms=args.batch_window_ms,
                op_timeout_s=args.op_timeout or (60.0 if tiny else 600.0),
                cell_timeout_s=cell_timeout,
                startup_timeout_s=args.startup_timeout or (120.0 if tiny else 900.0),
                backlog=args.backlog)
    return args, plan


def _device_line(setup: Setup) -> str:
    import torch

    line = f"torch {torch.__version__}, device {setup.device}"
    if setup.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(setup.device))
        line += f" ({props.name}, {props.total_memory / 1024**3:.0f} GiB)"
    else:
        line += f" ({torch.get_num_threads()} threads)"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    args, plan = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    info = machine_info()
    started = time.time()
    try:  # a timeout/kill (SIGTERM) cleans up like Ctrl-C does
        with sigterm_raises(lambda signum: KeyboardInterrupt(f"signal {signum}")):
            setup, cells = run(args, plan, log)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the worker was stopped", file=sys.stderr)
        return 130
    elapsed = time.time() - started
    options = [n for n in SPEED_NAMES if getattr(setup.options, n)]
    print(f"\nmachine: {info['nproc']} cores, {info['cpu']}, {info['mem_gib']} GiB, "
          f"Python {info['python']}, {_device_line(setup)}")
    model = {"tiny": "tiny random FLUX (worker.engine.tiny)",
             "random-full": "FLUX.1-dev architecture, random weights (incl. T5-XXL, CLIP-L)",
             "model": str(setup.model)}[setup.source]
    print(f"model: {model}; {setup.dtype}; {plan.size[0]}x{plan.size[1]}, {plan.steps} steps; "
          f"speed options: {', '.join(options) or 'none'}")
    print(f"worker: {setup.worker_mode}, {setup.pairing} rounds, batch_window_ms "
          f"{plan.batch_window_ms:g}, poll every {plan.poll_interval_s * 1000:g} ms, "
          f"{plan.rounds} rounds after {plan.warmup_rounds} warm-up; run took {elapsed:.0f} s")
    for note in setup.notes:
        print(note)
    print()
    print(render(cells))
    if args.json:
        write_json(args.json, {
            "machine": info, "argv": sys.argv, "elapsed_s": round(elapsed, 1),
            "setup": {"source": setup.source, "device": setup.device, "dtype": setup.dtype,
                      "model": str(setup.model), "worker": setup.worker_mode,
                      "pairing": setup.pairing,
                      "speed": options, "notes": setup.notes},
            "plan": {k: getattr(plan, k) for k in plan.__dataclass_fields__},
            "cells": [c.summary() for c in cells],
        })
    return 1 if any(c.errors for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
