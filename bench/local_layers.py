"""The layers ``local_worker.py`` measures, and what it records of them.

* the engine: ``FluxEngine.run`` on B compatible one-image jobs in this process;
* the worker over HTTP, closed loop: B jobs POSTed together, each polled until terminal,
  its image downloaded (one round); and its backlog: B x rounds jobs at once.

A :class:`Cell` is one layer at one batch size; a :class:`JobSample` one worker job,
timed by the client and by the worker's own timestamps.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.harness.cpu import CpuWindow
from bench.harness.load import BenchError, error_kind, json_object, poll_until
from bench.harness.report import percentile

PROMPT = "a red cat with a blue hat, oil painting"
TERMINAL = frozenset({"completed", "failed", "canceled"})
BACKLOG_SUBMITTERS = 4  # concurrent POSTs while filling the backlog


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


def _job_body(plan: Plan, seed: int) -> dict[str, Any]:
    return {"prompt": f"{PROMPT} #{seed}", "width": plan.size[0], "height": plan.size[1],
            "num_inference_steps": plan.steps, "guidance_scale": plan.guidance,
            "num_images": 1, "seed": seed, "output_format": "jpeg",
            "enable_safety_checker": False, "output": "url"}


def _job_spec(plan: Plan, seed: int) -> Any:
    from worker.engine import JobSpec

    return JobSpec(prompt=f"{PROMPT} #{seed}", mode="text-to-image", width=plan.size[0],
                   height=plan.size[1], steps=plan.steps, guidance=plan.guidance,
                   num_images=1, seed=seed, output_format="jpeg")


@contextlib.contextmanager
def _watch(cell: Cell, worker_pid: int | None, *, own_is_engine: bool) -> Iterator[None]:
    """Add the CPU seconds of this process, of the worker process tree and of the rest of
    the machine over the block to ``cell``. ``own_is_engine``: this process is what
    generates (the engine, or the in-process worker with its client)."""
    window = CpuWindow({"worker": worker_pid} if worker_pid else None)
    try:
        yield
    finally:
        cpu = window.stop()
        if not math.isnan(cpu.other_s):
            cell.other_cpu_s = (cell.other_cpu_s or 0.0) + cpu.other_s
        if own_is_engine:
            cell.cpu_s = (cell.cpu_s or 0.0) + cpu.own_s
        else:
            cell.cpu_s = (cell.cpu_s or 0.0) + cpu.trees.get("worker", 0.0)
            cell.client_cpu_s = (cell.client_cpu_s or 0.0) + cpu.own_s


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


# --------------------------------------------------------------------------- worker layer


async def _submit(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    job_id = json_object(await client.post("/v1/jobs", json=body), 202, show_body=True).get("id")
    if not isinstance(job_id, str):
        raise BenchError("no job id")
    return job_id


async def _wait_terminal(client: httpx.AsyncClient, job_id: str, poll_s: float
                         ) -> dict[str, Any]:
    info, _ = await poll_until(client, f"/v1/jobs/{job_id}", poll_s, TERMINAL, show_body=True)
    if info["status"] != "completed":
        raise BenchError(f"job {info['status']}: {info.get('error')}")
    return info


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


async def _worker_round(client: httpx.AsyncClient, batch: int, seed: int, plan: Plan,
                        cell: Cell, kinds: collections.Counter[str]) -> None:
    try:
        wall, jobs = await asyncio.wait_for(_round(client, batch, seed, plan),
                                            plan.op_timeout_s)
    except (BenchError, TimeoutError, httpx.HTTPError, ExceptionGroup) as exc:
        kinds[error_kind(exc)] += 1
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
                kinds[error_kind(exc)] += 1

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
                    info = json_object(await client.get(f"/v1/jobs/{job_id}"), 200, show_body=True)
                    if info.get("status") in TERMINAL:
                        infos[job_id] = info
                pending = [i for i in pending if i not in infos]
                if pending:
                    await asyncio.sleep(plan.poll_interval_s)
            if pending:
                kinds["not terminal in time"] += len(pending)
                cell.truncated = True
        except (BenchError, TimeoutError, httpx.HTTPError) as exc:
            kinds[error_kind(exc)] += 1
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
