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

* ``--tiny`` (default): ``providers.local.tiny.build_tiny_flux`` in a temp folder, CPU,
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
import collections
import contextlib
import gc
import json
import logging
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.overhead import (
    OTHER_LOAD_WARN,
    Service,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    machine_info,
    percentile,
    wait_quiet,
)

HOST = "127.0.0.1"
PROMPT = "a red cat with a blue hat, oil painting"
SPEED_NAMES = ("compile", "channels_last", "tf32", "fuse_qkv", "fp8")
TERMINAL = frozenset({"completed", "failed", "canceled"})
MAX_POLLS = 100_000  # per job; the op timeout ends a stuck job long before
MAX_ROUNDS = 200
BACKLOG_SUBMITTERS = 4  # concurrent POSTs while filling the backlog

# --------------------------------------------------------------------------- FLUX.1-dev

# black-forest-labs/FLUX.1-dev, each component's config.json (the parts that shape it).
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_DEV_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
CLIP_L: dict[str, Any] = {  # openai/clip-vit-large-patch14, text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
T5_XXL: dict[str, Any] = {  # google/t5-v1_1-xxl, encoder only
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
FULL_PARAMS = 16.87e9  # the four above, counted on the meta device
FULL_MIN_FREE_GIB = 40.0  # bf16 weights (~31.4 GiB) plus activations at 1024x1024, batch 4


class BenchError(Exception):
    """A job or round did not end as it should (status, body, timeout)."""


class SetupError(Exception):
    """The benchmark cannot run with these arguments or on this machine; says why."""


# --------------------------------------------------------------------------- the engine


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
    from providers.local.engine import SpeedOptions
    from providers.local.worker.loader import speed_options as worker_rule
    from providers.local.worker.settings import WorkerSettings

    if "auto" in names:
        flags: dict[str, Any] = dict.fromkeys(SPEED_NAMES, "auto")
        resolved: Any = worker_rule(WorkerSettings(**flags), device)
        return resolved
    return SpeedOptions(**{name: name in names for name in SPEED_NAMES})


def _quiet_progress() -> None:
    """No tqdm bars from loading or generating."""
    with contextlib.suppress(Exception):
        import diffusers.utils.logging as dlog

        dlog.disable_progress_bar()
    with contextlib.suppress(Exception):
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()


@contextlib.contextmanager
def _default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_random_full_engine(
    device: str,
    dtype: str,
    options: Any,
    *,
    configs: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """A FluxEngine on the FLUX.1-dev architecture with random weights, built on ``device``.

    Every parameter is allocated on ``device`` in ``dtype`` (torch's device context and
    default dtype), so nothing passes through host memory. ``configs`` replaces the
    components' configs (keys transformer, vae, clip, t5), for a scaled-down check of
    this code on a CPU; the benchmark itself always uses the full ones. The pipelines
    are wrapped the way ``FluxEngine.load`` does it (img2img and inpaint via
    ``from_pipe``, progress bars off, then the speed options on the shared modules).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxImg2ImgPipeline,
        FluxInpaintPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from providers.local._speed import apply_speed_options
    from providers.local.engine import DTYPES, FluxEngine, Mode
    from providers.local.tiny import _SCHEDULER_CONFIG, _clip_tokenizer, _t5_tokenizer

    cfg = {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_DEV_VAE, "clip": CLIP_L,
           "t5": T5_XXL} | (configs or {})
    torch_dtype = DTYPES[dtype]
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    clip_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(torch_dtype):
        transformer = FluxTransformer2DModel(**cfg["transformer"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["clip"], **clip_ids))
        text_encoder_2 = T5EncoderModel(T5Config(**cfg["t5"], pad_token_id=0, eos_token_id=1))
    modules: list[Any] = [transformer, vae, text_encoder, text_encoder_2]
    for module in modules:
        module.eval()
        module.requires_grad_(False)
    pipe: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.to(device)  # already there; as in FluxEngine.load
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # from_pipe's misleading dtype warnings
    try:
        pipes: dict[Mode, Any] = {
            "text-to-image": pipe,
            "image-to-image": FluxImg2ImgPipeline.from_pipe(pipe, dtype=torch_dtype),
            "inpainting": FluxInpaintPipeline.from_pipe(pipe, dtype=torch_dtype),
        }
    finally:
        diffusers_logger.setLevel(level)
    for each in pipes.values():
        each.set_progress_bar_config(disable=True)
    applied = apply_speed_options(pipe, options, device=device)
    return FluxEngine(pipes, path=Path("random-init:FLUX.1-dev"), device=device, dtype=dtype,
                      applied=applied)


def check_random_full(device: str, dtype: str) -> None:
    """Refuse --random-full where it cannot work, before allocating anything."""
    import torch

    if not device.startswith("cuda"):
        raise SetupError("--random-full needs --device cuda: the full FLUX.1-dev architecture "
                         "has ~17B parameters (a CPU would take hours per image, and fp32 "
                         "would need ~67 GB of RAM)")
    if dtype not in ("bf16", "fp16"):
        raise SetupError(f"--random-full runs in bf16 or fp16, not {dtype} (~67 GB of fp32 "
                         "weights); use --dtype bf16")
    free, total = torch.cuda.mem_get_info(torch.device(device))
    gib = 1024**3
    if free / gib < FULL_MIN_FREE_GIB:
        raise SetupError(f"--random-full needs about {FULL_MIN_FREE_GIB:.0f} GiB of free GPU "
                         f"memory ({FULL_PARAMS * 2 / gib:.1f} GiB of {dtype} weights plus "
                         f"activations); this GPU has {free / gib:.1f} of {total / gib:.1f} "
                         "GiB free")


# --------------------------------------------------------------------------- samples


@dataclass
class JobSample:
    """One worker job, timed by the client and by the worker's own timestamps."""

    latency_s: float  # POST sent -> image downloaded
    submit_s: float  # the POST's round trip
    queue_s: float  # worker: created -> its batch started
    run_s: float  # worker: batch started -> finished (pipeline + encode + bookkeeping)
    inference_s: float  # worker: the pipeline call alone
    notice_s: float  # worker finished -> a poll answered "completed"
    fetch_s: float  # the image download(s)
    batch_size: int
    batch_id: str


@dataclass
class Cell:
    layer: str  # engine | worker | worker backlog
    batch: int
    round_walls: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    images: int = 0
    wall_s: float = 0.0  # images / wall_s = images/s
    jobs: list[JobSample] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    truncated: bool = False
    cpu_s: float | None = None  # the process doing the generation (engine or worker)
    client_cpu_s: float | None = None  # this process, when it is only the client
    other_cpu_s: float | None = None  # the machine's CPU spent elsewhere meanwhile
    startup_s: float | None = None  # the worker's start (load + warm-up), once per B

    @property
    def rounds(self) -> int:
        return len(self.round_walls)

    @property
    def ips(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else math.nan

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    def round_p50(self) -> float:
        return percentile(self.round_walls, 50)

    def other_load(self) -> float:
        if self.other_cpu_s is None or self.wall_s <= 0:
            return 0.0
        return self.other_cpu_s / self.wall_s

    def summary(self) -> dict[str, Any]:
        def ms(values: Sequence[float]) -> dict[str, float]:
            return {"p50": round(percentile(values, 50) * 1000, 2),
                    "p99": round(percentile(values, 99) * 1000, 2),
                    "mean": round(statistics.fmean(values) * 1000, 2) if values else math.nan}

        out: dict[str, Any] = {
            "layer": self.layer, "batch": self.batch, "rounds": self.rounds,
            "images": self.images, "wall_s": round(self.wall_s, 4),
            "images_per_s": round(self.ips, 3), "latency_ms": ms(self.latencies),
            "round_wall_ms": ms(self.round_walls),
            "batch_sizes": dict(collections.Counter(self.batch_sizes)),
            "errors": self.errors, "error_kinds": self.error_kinds,
            "truncated": self.truncated, "cpu_s": self.cpu_s, "client_cpu_s": self.client_cpu_s,
            "other_cpu_s": self.other_cpu_s, "startup_s": self.startup_s,
        }
        if self.jobs:
            out["breakdown_ms"] = {name: ms([getattr(j, name) for j in self.jobs])
                                   for name in ("submit_s", "queue_s", "run_s", "inference_s",
                                                "notice_s", "fetch_s")}
        return out


@dataclass
class Plan:
    size: tuple[int, int]
    steps: int
    guidance: float
    batches: list[int]
    rounds: int
    warmup_rounds: int
    poll_interval_s: float
    batch_window_ms: float
    op_timeout_s: float
    cell_timeout_s: float
    startup_timeout_s: float
    backlog: bool


def _job_body(plan: Plan, seed: int) -> dict[str, Any]:
    return {"prompt": f"{PROMPT} #{seed}", "width": plan.size[0], "height": plan.size[1],
            "num_inference_steps": plan.steps, "guidance_scale": plan.guidance,
            "num_images": 1, "seed": seed, "output_format": "jpeg",
            "enable_safety_checker": False, "output": "url"}


def _job_spec(plan: Plan, seed: int) -> Any:
    from providers.local.engine import JobSpec

    return JobSpec(prompt=f"{PROMPT} #{seed}", mode="text-to-image", width=plan.size[0],
                   height=plan.size[1], steps=plan.steps, guidance=plan.guidance,
                   num_images=1, seed=seed, output_format="jpeg")


@contextlib.contextmanager
def _watch(cell: Cell, worker_pid: int | None, *, own_is_engine: bool) -> Iterator[None]:
    """Add the CPU seconds of this process, of the worker process tree and of the rest of
    the machine over the block to ``cell``. ``own_is_engine``: this process is what
    generates (the engine, or the in-process worker with its client)."""
    own0 = time.process_time()
    worker0 = cpu_seconds(worker_pid) if worker_pid else 0.0
    busy0 = machine_busy_seconds()
    try:
        yield
    finally:
        own = time.process_time() - own0
        worker = cpu_seconds(worker_pid) - worker0 if worker_pid else 0.0
        other = machine_busy_seconds() - busy0 - own - worker
        if not math.isnan(other):
            cell.other_cpu_s = (cell.other_cpu_s or 0.0) + max(0.0, other)
        if own_is_engine:
            cell.cpu_s = (cell.cpu_s or 0.0) + own
        else:
            cell.cpu_s = (cell.cpu_s or 0.0) + worker
            cell.client_cpu_s = (cell.client_cpu_s or 0.0) + own


# --------------------------------------------------------------------------- engine layer


def _engine_round(engine: Any, batch: int, seed: int, plan: Plan, cell: Cell | None) -> None:
    """One ``engine.run`` of ``batch`` one-image jobs; recorded in ``cell`` (None: warm-up)."""
    specs = [_job_spec(plan, seed + i) for i in range(batch)]
    t0 = time.perf_counter()
    images = engine.run(specs)
    wall = time.perf_counter() - t0
    if sum(len(x) for x in images) != batch:
        raise BenchError(f"engine returned {sum(len(x) for x in images)} images, not {batch}")
    if cell is not None:
        cell.round_walls.append(wall)
        cell.latencies += [wall] * batch
        cell.images += batch
        cell.wall_s += wall


def measure_engine(engine: Any, batch: int, plan: Plan, log: Callable[[str], None]) -> Cell:
    """The engine alone: ``rounds`` calls after the warm-up ones (sequential pairing)."""
    cell = Cell("engine", batch)
    seed = 1000 * batch
    for w in range(plan.warmup_rounds):
        _engine_round(engine, batch, seed - batch * (w + 1), plan, None)
    stop_at = time.monotonic() + plan.cell_timeout_s
    for r in range(plan.rounds):
        if time.monotonic() > stop_at:
            cell.truncated = True
            break
        with _watch(cell, None, own_is_engine=True):
            _engine_round(engine, batch, seed + batch * r, plan, cell)
    log(f"  engine b={batch}: p50 {cell.p(50) * 1000:.1f} ms, {cell.ips:.2f} images/s")
    return cell


# --------------------------------------------------------------------------- worker layer


def _json(response: httpx.Response, expect: int) -> dict[str, Any]:
    if response.status_code != expect:
        raise BenchError(f"HTTP {response.status_code}: {response.text[:200]}")
    try:
        body = response.json()
    except ValueError:
        raise BenchError("body is not JSON") from None
    if not isinstance(body, dict):
        raise BenchError("body is not a JSON object")
    return body


async def _submit(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    job_id = _json(await client.post("/v1/jobs", json=body), 202).get("id")
    if not isinstance(job_id, str):
        raise BenchError("no job id")
    return job_id


async def _wait_terminal(client: httpx.AsyncClient, job_id: str, poll_s: float
                         ) -> dict[str, Any]:
    for _ in range(MAX_POLLS):
        await asyncio.sleep(poll_s)
        info = _json(await client.get(f"/v1/jobs/{job_id}"), 200)
        if info.get("status") in TERMINAL:
            if info["status"] != "completed":
                raise BenchError(f"job {info['status']}: {info.get('error')}")
            return info
    raise BenchError("never terminal")


async def _one_job(client: httpx.AsyncClient, body: dict[str, Any], poll_s: float
                   ) -> JobSample:
    t0 = time.perf_counter()
    job_id = await _submit(client, body)
    posted = time.perf_counter()
    info = await _wait_terminal(client, job_id, poll_s)
    seen_wall, seen = time.time(), time.perf_counter()
    outputs = info.get("outputs") or []
    if len(outputs) != 1:
        raise BenchError(f"{len(outputs)} outputs, not 1")
    for url in outputs:
        r = await client.get(url)
        if r.status_code != 200 or not r.content:
            raise BenchError(f"output download: HTTP {r.status_code}")
    done = time.perf_counter()
    batch = info.get("batch") or {}
    created, started, finished = info["created_at"], info["started_at"], info["finished_at"]
    return JobSample(
        latency_s=done - t0,
        submit_s=posted - t0,
        queue_s=started - created,
        run_s=finished - started,
        inference_s=(info.get("timings") or {}).get("inference_ms", math.nan) / 1000,
        notice_s=seen_wall - finished,
        fetch_s=done - seen,
        batch_size=int(batch.get("size", 0)),
        batch_id=str(batch.get("id")),
    )


async def _round(client: httpx.AsyncClient, batch: int, seed: int, plan: Plan
                 ) -> tuple[float, list[JobSample]]:
    """B jobs submitted together; the wall time until the last image is downloaded."""
    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_one_job(client, _job_body(plan, seed + i),
                                            plan.poll_interval_s)) for i in range(batch)]
    return time.perf_counter() - t0, [t.result() for t in tasks]


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(sorted({_error_kind(e) for e in exc.exceptions}))
    if isinstance(exc, TimeoutError):
        return "op timeout"
    if isinstance(exc, BenchError):
        return str(exc)[:120]
    return type(exc).__name__


async def _worker_round(client: httpx.AsyncClient, batch: int, seed: int, plan: Plan,
                        cell: Cell, kinds: collections.Counter[str]) -> None:
    try:
        wall, jobs = await asyncio.wait_for(_round(client, batch, seed, plan),
                                            plan.op_timeout_s)
    except (BenchError, TimeoutError, httpx.HTTPError, ExceptionGroup) as exc:
        kinds[_error_kind(exc)] += 1
        return
    cell.round_walls.append(wall)
    cell.jobs += jobs
    cell.latencies += [j.latency_s for j in jobs]
    cell.batch_sizes += [j.batch_size for j in jobs]
    cell.images += batch
    cell.wall_s += wall


async def measure_worker(base_url: str, batch: int, plan: Plan, worker_pid: int | None,
                         engine: Any, log: Callable[[str], None]) -> list[Cell]:
    """The worker's closed-loop rounds, then (``plan.backlog``) its backlog.

    With ``engine`` (interleaved pairing) an engine round runs beside each worker round,
    in alternating order, so that both layers see the same machine state; the worker is
    idle during the engine's round and the engine during the worker's. The engine call
    blocks this event loop on purpose: the client has nothing in flight then.
    """
    limits = httpx.Limits(max_connections=2 * batch + BACKLOG_SUBMITTERS + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=plan.op_timeout_s,
                                 limits=limits, trust_env=False) as client:
        seed = 100_000 * batch
        for w in range(plan.warmup_rounds):  # untimed; a failure here stops the benchmark
            if engine is not None:
                _engine_round(engine, batch, seed - batch * (w + 1), plan, None)
            await asyncio.wait_for(_round(client, batch, seed - batch * (w + 1), plan),
                                   plan.op_timeout_s)
        cells = [Cell("engine", batch)] if engine is not None else []
        cell = Cell("worker", batch)
        kinds: collections.Counter[str] = collections.Counter()
        stop_at = time.monotonic() + plan.cell_timeout_s
        own_is_engine = worker_pid is None
        for r in range(plan.rounds):
            if time.monotonic() > stop_at:
                for each in (*cells, cell):
                    each.truncated = True
                break
            round_seed = seed + batch * r
            if engine is not None and r % 2 == 0:
                with _watch(cells[0], worker_pid, own_is_engine=True):
                    _engine_round(engine, batch, round_seed, plan, cells[0])
            with _watch(cell, worker_pid, own_is_engine=own_is_engine):
                await _worker_round(client, batch, round_seed, plan, cell, kinds)
            if engine is not None and r % 2 == 1:
                with _watch(cells[0], worker_pid, own_is_engine=True):
                    _engine_round(engine, batch, round_seed, plan, cells[0])
        cell.errors, cell.error_kinds = sum(kinds.values()), dict(kinds)
        cells.append(cell)
        for each in cells:
            log(f"  {each.layer} b={batch}: p50 {each.p(50) * 1000:.1f} ms, "
                f"{each.ips:.2f} images/s"
                + (f", batch sizes {dict(collections.Counter(each.batch_sizes))}"
                   if each.batch_sizes else "")
                + (f", errors {each.error_kinds}" if each.errors else ""))
        if plan.backlog:
            seed += batch * plan.rounds
            cells.append(await _backlog(client, batch, seed, plan, worker_pid, log))
    return cells


async def _backlog(client: httpx.AsyncClient, batch: int, seed: int, plan: Plan,
                   worker_pid: int | None, log: Callable[[str], None]) -> Cell:
    """B x rounds jobs at once; images/s from the first POST to the last finished_at."""
    n = batch * plan.rounds
    cell = Cell("worker backlog", batch)
    kinds: collections.Counter[str] = collections.Counter()
    ids: list[str | None] = [None] * n
    next_index = 0
    first_post = time.time()

    async def submitter() -> None:
        nonlocal next_index
        while next_index < n:
            i, next_index = next_index, next_index + 1
            try:
                ids[i] = await _submit(client, _job_body(plan, seed + i))
            except (BenchError, httpx.HTTPError) as exc:
                kinds[_error_kind(exc)] += 1

    infos: dict[str, dict[str, Any]] = {}
    with _watch(cell, worker_pid, own_is_engine=worker_pid is None):
        try:
            submitters = [submitter() for _ in range(BACKLOG_SUBMITTERS)]
            await asyncio.wait_for(asyncio.gather(*submitters), plan.cell_timeout_s)
            last = next((i for i in reversed(ids) if i is not None), None)
            if last is not None:  # among the last to arrive: most others are done by then
                await asyncio.wait_for(_wait_terminal(client, last, plan.poll_interval_s),
                                       plan.cell_timeout_s + plan.op_timeout_s)
            # Then every job until all are terminal (concurrent POSTs arrive in any order).
            pending = [i for i in ids if i is not None]
            deadline = time.monotonic() + plan.op_timeout_s
            while pending and time.monotonic() < deadline:
                for job_id in pending:
                    info = _json(await client.get(f"/v1/jobs/{job_id}"), 200)
                    if info.get("status") in TERMINAL:
                        infos[job_id] = info
                pending = [i for i in pending if i not in infos]
                if pending:
                    await asyncio.sleep(plan.poll_interval_s)
            if pending:
                kinds["not terminal in time"] += len(pending)
                cell.truncated = True
        except (BenchError, TimeoutError, httpx.HTTPError) as exc:
            kinds[_error_kind(exc)] += 1
            cell.truncated = True
    finished: list[float] = []
    for info in infos.values():
        if info.get("status") != "completed":
            kinds[f"job {info.get('status')}"] += 1
            continue
        finished.append(float(info["finished_at"]))
        cell.batch_sizes.append(int((info.get("batch") or {}).get("size", 0)))
    cell.images = len(finished)
    cell.wall_s = max(finished) - first_post if finished else 0.0
    cell.errors, cell.error_kinds = sum(kinds.values()), dict(kinds)
    log(f"  backlog b={batch}: {cell.images} images in {cell.wall_s:.2f} s, "
        f"{cell.ips:.2f} images/s, batch sizes {dict(collections.Counter(cell.batch_sizes))}"
        + (f", errors {cell.error_kinds}" if cell.errors else ""))
    return cell


# --------------------------------------------------------------------------- workers


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("flux-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]


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
    argv = [*_cli(), "worker", "--model", str(model), "--device", device, "--dtype", dtype,
            "--host", HOST, "--port", str(port), "--max-batch-size", str(batch),
            "--safety-checker", "none"]
    t0 = time.perf_counter()
    svc = Service(f"worker[b={batch}]", argv, _worker_env(plan, options),
                  workdir / f"worker-b{batch}.log")
    try:
        svc.wait_ready(f"http://{HOST}:{port}/health", timeout_s=plan.startup_timeout_s)
        yield f"http://{HOST}:{port}", svc.pid, time.perf_counter() - t0
    finally:
        svc.stop()


@contextlib.contextmanager
def inprocess_worker(engine: Any, batch: int, plan: Plan) -> Iterator[tuple[str, None, float]]:
    """The worker app around ``engine``, served by uvicorn in a thread of this process."""
    import uvicorn

    from providers.local.worker.app import create_worker_app
    from providers.local.worker.settings import WorkerSettings

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


# --------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def _sizes(sizes: Sequence[int]) -> str:
    if not sizes:
        return "-"
    counts = collections.Counter(sizes)
    if len(counts) == 1:
        return f"{sizes[0]} (all)"
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items(), reverse=True))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([fmt(headers), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
                      *(fmt(r) for r in rows)])


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
            over, pct = _ms(extra), f"{100 * extra / base.round_p50():.0f}%"
        cpu = "-" if cell.cpu_s is None or not cell.images else \
            f"{cell.cpu_s / cell.images * 1000:.0f}"
        backlog = cell.layer == "worker backlog"
        errors = str(cell.errors) + (" (cut)" if cell.truncated else "")
        main_rows.append([
            cell.layer, str(cell.batch), "-" if backlog else str(cell.rounds), str(cell.images),
            "-" if backlog else _ms(cell.p(50)), "-" if backlog else _ms(cell.p(99)),
            f"{cell.ips:.2f}", _sizes(cell.batch_sizes), over, pct, cpu, errors,
        ])
        if cell.jobs:
            def p50(name: str, jobs: list[JobSample] = cell.jobs) -> str:
                return _ms(percentile([getattr(j, name) for j in jobs], 50))

            client = "-" if cell.client_cpu_s is None else \
                f"{cell.client_cpu_s / cell.images * 1000:.0f}"
            parts_rows.append([
                str(cell.batch), p50("latency_s"), p50("submit_s"), p50("queue_s"),
                p50("inference_s"), _ms(base.round_p50()) if base else "-",
                _ms(percentile([j.run_s - j.inference_s for j in cell.jobs], 50)),
                p50("notice_s"), p50("fetch_s"), client,
                "-" if cell.startup_s is None else f"{cell.startup_s:.1f}",
            ])
    out = [_table(["layer", "batch", "rounds", "images", "p50 ms", "p99 ms", "images/s",
                   "batch.size seen", "overhead/batch ms", "overhead %", "CPU ms/img",
                   "errors"], main_rows)]
    if parts_rows:
        out += ["", "worker job latency, p50 of each part (ms):", "",
                _table(["batch", "job", "POST", "queue", "pipeline (worker)",
                        "pipeline (engine)", "encode+rest", "poll notice", "image GET",
                        "client CPU ms/img", "worker start s"], parts_rows)]
    noisy = [c for c in cells if c.other_load() > OTHER_LOAD_WARN]
    if noisy:
        out.append("")
        out += [f"note: {c.layer} b={c.batch}: other processes used {c.other_load():.0%} of a "
                "core during the measurement" for c in noisy]
    return "\n".join(out)


# --------------------------------------------------------------------------- driver


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


def load_engine(setup: Setup, log: Callable[[str], None]) -> Any:
    from providers.local.engine import EngineError, FluxEngine

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


def run(args: argparse.Namespace, plan: Plan, log: Callable[[str], None]
        ) -> tuple[Setup, list[Cell]]:
    if args.wait_quiet > 0 and not wait_quiet(args.wait_quiet, log):
        log(f"warning: the machine was still busy after {args.wait_quiet:.0f}s; measuring anyway")
    _quiet_progress()
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
    layers = set(args.layers)
    pairing = args.pairing
    if pairing == "auto":  # two copies of a real model would not fit on most GPUs
        gpu_copies = worker_mode == "subprocess" and device.startswith("cuda")
        pairing = "sequential" if gpu_copies else "interleave"
    if layers != {"engine", "worker"}:
        pairing = "sequential"  # nothing to pair
    setup = Setup(source, device, dtype, speed_options(args.speed, device), worker_mode,
                  pairing, model=args.model)
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="flux-bench-local-") as tmp:
        workdir = Path(tmp)
        if source == "tiny":
            from providers.local.tiny import build_tiny_flux

            setup.model = build_tiny_flux(workdir / "tiny-flux")
        engine: Any = None
        try:
            if "engine" in layers or worker_mode == "inprocess":
                engine = load_engine(setup, log)
            if "engine" in layers and pairing == "sequential":
                log("engine layer")
                for batch in plan.batches:
                    cells.append(measure_engine(engine, batch, plan, log))
            if "worker" in layers:
                if worker_mode == "subprocess" and pairing == "sequential":
                    engine = None  # one copy of the model at a time (GPU memory)
                    free_engine(device)
                log(f"worker layer ({worker_mode}, {pairing})")
                for batch in plan.batches:
                    cells += _worker_cells(setup, engine, batch, plan, workdir, log)
        finally:
            engine = None
            free_engine(device)
            if args.keep_logs:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for f in workdir.glob("*.log"):
                    (args.keep_logs / f.name).write_bytes(f.read_bytes())
    order = {"engine": 0, "worker": 1, "worker backlog": 2}
    cells.sort(key=lambda c: (c.batch, order[c.layer]))
    return setup, cells


def _worker_cells(setup: Setup, engine: Any, batch: int, plan: Plan, workdir: Path,
                  log: Callable[[str], None]) -> list[Cell]:
    """Start a worker with max_batch_size=batch, measure it (and, interleaved, the
    engine), stop it."""
    server: contextlib.AbstractContextManager[tuple[str, int | None, float]]
    if setup.worker_mode == "subprocess":
        assert setup.model is not None
        server = subprocess_worker(setup.model, setup.device, setup.dtype, batch, plan,
                                   setup.options, workdir)
    else:
        server = inprocess_worker(engine, batch, plan)
    paired = engine if setup.pairing == "interleave" else None
    with server as (base_url, pid, startup_s):
        health = httpx.get(f"{base_url}/health", timeout=10.0, trust_env=False).json()
        log(f"  worker b={batch} up in {startup_s:.1f} s: max_batch_size "
            f"{health.get('max_batch_size')}, device {health.get('device')}")
        if health.get("max_batch_size") != batch:
            raise SetupError(f"the worker reports max_batch_size {health.get('max_batch_size')}")
        cells = asyncio.run(measure_worker(base_url, batch, plan, pid, paired, log))
    for cell in cells:
        cell.startup_s = startup_s if cell.layer == "worker" else None
    return cells


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x.strip()) for x in text.split(",") if x.strip()]


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
    ap.add_argument("--batches", type=_csv(int), default=[1, 2, 4],
                    help="comma-separated batch sizes (default 1,2,4)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="measured rounds per cell (default 40 for --tiny, else 5)")
    ap.add_argument("--warmup-rounds", type=int, default=None,
                    help="untimed rounds first (default 3 for --tiny, else 2)")
    ap.add_argument("--layers", type=_csv(str), default=["engine", "worker"],
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
    ap.add_argument("--speed", type=_csv(str), default=[],
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

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)  # a timeout/kill cleans up like Ctrl-C does
    info = machine_info()
    started = time.time()
    try:
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
    model = {"tiny": "tiny random FLUX (providers.local.tiny)",
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
        args.json.write_text(json.dumps({
            "machine": info, "argv": sys.argv, "elapsed_s": round(elapsed, 1),
            "setup": {"source": setup.source, "device": setup.device, "dtype": setup.dtype,
                      "model": str(setup.model), "worker": setup.worker_mode,
                      "pairing": setup.pairing,
                      "speed": options, "notes": setup.notes},
            "plan": {k: getattr(plan, k) for k in plan.__dataclass_fields__},
            "cells": [c.summary() for c in cells],
        }, indent=2, default=str))
    return 1 if any(c.errors for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
