"""What ``local_worker.py`` runs: device, dtype, speed options, the engine, the worker.

The engine is loaded (or, for ``--random-full``, built) in this process; the worker
runs as ``flux-proxy worker`` in a subprocess, or as the same app under uvicorn in a
thread of this process (``inprocess``), both on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness.procs import HOST, Service, cli, free_port
from bench.local_fluxdev import SetupError, build_random_full_engine, check_random_full
from bench.local_layers import Plan

SPEED_NAMES = ("compile", "channels_last", "tf32", "fuse_qkv", "fp8")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"--device cuda, but torch {torch.__version__} sees no CUDA GPU "
                         f"(built for CUDA {torch.version.cuda or 'none'})")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bf16" if device == "cuda" else "fp32"


def speed_options(names: Sequence[str], device: str) -> Any:
    """``--speed`` as the engine's SpeedOptions: listed names on; ``auto`` = each option
    on where the device supports it (the worker's own rule, ``loader.speed_options``)."""
    from worker.engine import SpeedOptions
    from worker.loader import speed_options as worker_rule
    from worker.settings import WorkerSettings

    if "auto" in names:
        flags: dict[str, Any] = dict.fromkeys(SPEED_NAMES, "auto")
        resolved: Any = worker_rule(WorkerSettings(**flags), device)
        return resolved
    return SpeedOptions(**{name: name in names for name in SPEED_NAMES})


def quiet_progress() -> None:
    """No tqdm bars from loading or generating."""
    with contextlib.suppress(Exception):
        import diffusers.utils.logging as dlog

        dlog.disable_progress_bar()
    with contextlib.suppress(Exception):
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()


# --------------------------------------------------------------------------- engine


@dataclass
class Setup:
    source: str  # tiny | model | random-full
    device: str
    dtype: str
    options: Any
    worker_mode: str  # subprocess | inprocess
    pairing: str  # interleave | sequential
    model: Path | None = None
    notes: list[str] = field(default_factory=list)


def make_setup(args: argparse.Namespace) -> Setup:
    """What runs, from the command line: the model's source, device, dtype, speed
    options, how the worker runs and how rounds pair (SetupError where that cannot
    work). Progress bars of loading and generating are turned off."""
    quiet_progress()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    source = "random-full" if args.random_full else "model" if args.model else "tiny"
    worker_mode = args.worker
    if worker_mode == "auto":
        worker_mode = "inprocess" if source == "random-full" else "subprocess"
    if source == "random-full" and worker_mode == "subprocess":
        raise SetupError("--random-full keeps its random weights in this process; the worker "
                         "must run here too: use --worker inprocess (the default for it)")
    if source == "random-full":
        check_random_full(device, dtype)
    pairing = args.pairing
    if pairing == "auto":  # two copies of a real model would not fit on most GPUs
        gpu_copies = worker_mode == "subprocess" and device.startswith("cuda")
        pairing = "sequential" if gpu_copies else "interleave"
    if set(args.layers) != {"engine", "worker"}:
        pairing = "sequential"  # nothing to pair
    return Setup(source, device, dtype, speed_options(args.speed, device), worker_mode,
                 pairing, model=args.model)


def load_engine(setup: Setup, log: Callable[[str], None]) -> Any:
    from worker.engine import EngineError, FluxEngine

    t0 = time.perf_counter()
    try:
        if setup.source == "random-full":
            check_random_full(setup.device, setup.dtype)
            engine = build_random_full_engine(setup.device, setup.dtype, setup.options)
        else:
            assert setup.model is not None
            engine = FluxEngine.load(setup.model, device=setup.device, dtype=setup.dtype,
                                     options=setup.options)
    except EngineError as exc:
        raise SetupError(str(exc)) from exc
    took = time.perf_counter() - t0
    setup.notes.append(f"engine load/build in this process: {took:.1f} s")
    log(f"engine ready in {took:.1f} s: {engine.device_info()}")
    return engine


def free_engine(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- workers


def _worker_env(plan: Plan, options: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_WORKER_")}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "FLUX_WORKER_BATCH_WINDOW_MS": str(plan.batch_window_ms),
        "FLUX_WORKER_MAX_QUEUE": str(max(64, max(plan.batches) * plan.rounds + 8)),
        "FLUX_WORKER_LOG_LEVEL": "warning",
    }
    for name in SPEED_NAMES:
        env[f"FLUX_WORKER_{name.upper()}"] = "true" if getattr(options, name) else "false"
    return env


@contextlib.contextmanager
def subprocess_worker(model: Path, device: str, dtype: str, batch: int, plan: Plan,
                      options: Any, workdir: Path) -> Iterator[tuple[str, int, float]]:
    """`flux-proxy worker` with max_batch_size=batch: (base URL, pid, start-up seconds)."""
    port = free_port()
    argv = [*cli(), "worker", "--model", str(model), "--device", device, "--dtype", dtype,
            "--host", HOST, "--port", str(port), "--max-batch-size", str(batch),
            "--safety-checker", "none"]
    t0 = time.perf_counter()
    svc = Service(f"worker[b={batch}]", argv, workdir / f"worker-b{batch}.log",
                  env=_worker_env(plan, options))
    try:
        svc.wait_ready(f"http://{HOST}:{port}/health", timeout_s=plan.startup_timeout_s)
        yield f"http://{HOST}:{port}", svc.pid, time.perf_counter() - t0
    finally:
        svc.stop()


@contextlib.contextmanager
def inprocess_worker(engine: Any, batch: int, plan: Plan) -> Iterator[tuple[str, None, float]]:
    """The worker app around ``engine``, served by uvicorn in a thread of this process."""
    import uvicorn

    from worker.app import create_worker_app
    from worker.settings import WorkerSettings

    port = free_port()
    settings = WorkerSettings(
        host=HOST, port=port, max_batch_size=batch, batch_window_ms=plan.batch_window_ms,
        max_queue=max(64, batch * plan.rounds + 8), safety_checker="none",
        log_level="warning", token=None, warmup=False,
    )
    app = create_worker_app(settings, engine=engine)
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_config=None,
                                           access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=15))
    thread = threading.Thread(target=server.run, name=f"worker-b{batch}", daemon=True)
    t0 = time.perf_counter()
    thread.start()
    try:
        deadline = time.monotonic() + plan.startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise SetupError("the in-process worker stopped during start-up")
            if time.monotonic() > deadline:
                raise SetupError(f"the in-process worker did not start in "
                                 f"{plan.startup_timeout_s:.0f} s")
            time.sleep(0.05)
        yield f"http://{HOST}:{port}", None, time.perf_counter() - t0
    finally:
        server.should_exit = True
        thread.join(30)


def worker_server(setup: Setup, engine: Any, batch: int, plan: Plan, workdir: Path
                  ) -> contextlib.AbstractContextManager[tuple[str, int | None, float]]:
    """The worker ``setup`` asks for, with max_batch_size=batch: (base URL, pid or None
    when in-process, start-up seconds)."""
    if setup.worker_mode == "subprocess":
        assert setup.model is not None
        return subprocess_worker(setup.model, setup.device, setup.dtype, batch, plan,
                                 setup.options, workdir)
    return inprocess_worker(engine, batch, plan)
