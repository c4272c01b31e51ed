"""The job queue and batcher: one engine, one pipeline call at a time.

Batching. The batcher takes the oldest queued job, then gathers the queued jobs
with the same ``batch_key()`` (mode, size, steps, guidance, strength), oldest first, while
the batch holds at most ``max_batch_size`` *images* (a job of 4 images fills a
batch of 4; a single job larger than the cap runs alone). When the batch is not
full it waits up to ``batch_window_s`` for more compatible jobs to arrive. The
pipeline call runs in a worker thread (``asyncio.to_thread``), so the event loop
keeps answering polls, submits and cancels meanwhile.

Cancel. A queued job is removed from the queue and is ``canceled`` at once. A
running job is ``canceled`` at once too (its images, when they come, are
dropped); the pipeline call itself stops at the next step boundary only when
*every* job in it is canceled, so cancelling one job never kills its batch
partners.

GPU-seconds (what the proxy bills). The device time of a batch is the wall time
of the worker-thread section that holds the device: the pipeline call plus the
safety check and encoding of its images. Each job is charged that time x its
images / the batch's images, so a batch's jobs together pay exactly the batch's
time. A job canceled while running pays its share of the time up to the cancel;
the device time spent after it (at most one step when the whole call stops) is
not charged to anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from common.logging import get_logger

from .jobs import Batch, ErrorKind, Job, JobStatus, new_id
from .metrics import WorkerMetrics
from .runner import BatchResult, BatchRunner
from .spec import JobSpec

log = get_logger("flux_worker.queue")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the worker's queue is full")
        self.retry_after_s = retry_after_s


class JobQueue:
    def __init__(
        self,
        runner: BatchRunner,
        *,
        max_batch_size: int = 4,
        batch_window_s: float = 0.02,
        max_queue: int = 64,
        job_ttl_s: float = 3600.0,
        max_finished: int = 1024,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size
        self._window = batch_window_s
        self.max_queue = max_queue
        self._ttl = job_ttl_s
        self._max_finished = max_finished
        self.metrics = metrics or WorkerMetrics()
        self._clock = clock
        self._jobs: dict[str, Job] = {}  # every job still remembered, by id
        self._queued: list[Job] = []  # oldest first
        self._running: Batch | None = None
        self._finished: OrderedDict[str, Job] = OrderedDict()  # in finishing order
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._avg_batch_s = 1.0
        self.metrics.watch_queue(lambda: self.depth, lambda: self.running)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._loop(), name="flux-worker-batcher")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop batching; a running pipeline call is told to stop at its next step."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        self._arrived.set()
        await asyncio.wait({task}, timeout=timeout_s)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    # ------------------------------------------------------------------ client side

    @property
    def depth(self) -> int:
        return len(self._queued)

    @property
    def running(self) -> int:
        return len(self._running.jobs) if self._running else 0

    def submit(self, spec: JobSpec, *, safety: bool, output: str = "url") -> Job:
        """Queue ``spec`` (QueueFull past max_queue). ``output``: url | base64, kept
        for rendering the job."""
        self._expire()
        if len(self._queued) >= self.max_queue:
            self.metrics.jobs_rejected.labels("queue_full").inc()
            raise QueueFull(self.retry_after_s())
        job = Job(id=new_id(), spec=spec, safety=safety, created_at=self._clock(),
                  output_format=str(spec.output_format), output=output)
        job.total = job.expected_steps
        self._jobs[job.id] = job
        self._queued.append(job)
        self.metrics.jobs_submitted.inc()
        self._arrived.set()
        log.info("job.queued", job_id=job.id, images=spec.num_images, depth=len(self._queued))
        return job

    def get(self, job_id: str) -> Job | None:
        self._expire()
        return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """Jobs ahead of this one in the queue (0: next), or None when not queued."""
        try:
            return self._queued.index(job)
        except ValueError:
            return None

    def cancel(self, job_id: str) -> Job | None:
        """Cancel now (see the module doc); a terminal job is returned as it is."""
        job = self.get(job_id)
        if job is None or job.terminal:
            return job
        job.cancel_requested = True
        if job.status == "queued":
            self._queued.remove(job)
            job.release_inputs()
        elif self._running is not None:  # charge its share of the device time so far
            elapsed = time.perf_counter() - self._running.started
            job.gpu_seconds = _share(elapsed, job, self._running)
        self._finish(job, "canceled")
        return job

    def retry_after_s(self) -> int:
        """A guess at when a slot frees up: the queue's batches x the recent batch time."""
        batches = max(1, math.ceil(len(self._queued) / self.max_batch_size))
        return max(1, min(120, math.ceil(self._avg_batch_s * batches)))

    # ------------------------------------------------------------------ bookkeeping

    def _finish(self, job: Job, status: JobStatus, *, error: str | None = None,
                error_kind: ErrorKind | None = None) -> None:
        job.status = status
        job.finished_at = self._clock()
        job.error, job.error_kind = error, error_kind
        if status != "completed":
            job.outputs = []
        self._finished[job.id] = job
        self.metrics.jobs_finished.labels(status).inc()
        if job.gpu_seconds:
            self.metrics.gpu_seconds.inc(job.gpu_seconds)
        job.done.set()
        log.info("job.finished", job_id=job.id, status=status, error_kind=error_kind,
                 batch_id=job.batch_id, gpu_seconds=job.gpu_seconds)

    def _expire(self) -> None:
        """Forget finished jobs past the TTL, and the oldest past max_finished."""
        cutoff = self._clock() - self._ttl
        while self._finished:
            job_id, job = next(iter(self._finished.items()))
            old = job.finished_at is not None and job.finished_at < cutoff
            if not old and len(self._finished) <= self._max_finished:
                break
            del self._finished[job_id]
            self._jobs.pop(job_id, None)

    # ------------------------------------------------------------------ batcher

    async def _loop(self) -> None:
        while not self._stopping:
            jobs = await self._collect()
            if jobs:
                await self._run(jobs)

    def _compatible(self, first: Job) -> tuple[list[Job], int]:
        """``first`` plus the queued jobs with its batch key, oldest first, within the cap."""
        key = first.spec.batch_key()
        jobs, images = [first], first.spec.num_images
        for job in self._queued:
            if images >= self.max_batch_size:
                break
            n = job.spec.num_images
            if job is not first and images + n <= self.max_batch_size \
                    and job.spec.batch_key() == key:
                jobs.append(job)
                images += n
        return jobs, images

    async def _collect(self) -> list[Job]:
        """The next batch: the oldest job and its partners, waiting up to the window."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not self._queued:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            first = self._queued[0]
            deadline = loop.time() + self._window
            jobs, images = self._compatible(first)
            while images < self.max_batch_size and not self._stopping:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                if first.status != "queued":
                    break
                jobs, images = self._compatible(first)
            if first.status != "queued":  # canceled while we waited: start over
                continue
            jobs = [j for j in jobs if j.status == "queued"]
            for job in jobs:
                self._queued.remove(job)
            return jobs
        return []

    async def _run(self, jobs: list[Job]) -> None:
        batch = Batch(id=new_id()[:12], jobs=jobs, images=sum(j.spec.num_images for j in jobs))
        now = self._clock()
        for job in jobs:
            job.status, job.started_at = "running", now
            job.batch_id, job.batch_size, job.batch_images = batch.id, len(jobs), batch.images
        self.metrics.batch_jobs.observe(len(jobs))
        self.metrics.batch_images.observe(batch.images)
        log.info("batch.started", batch_id=batch.id, jobs=len(jobs), images=batch.images,
                 job_ids=[j.id for j in jobs])
        self._running = batch
        batch.started = time.perf_counter()
        try:
            result = await asyncio.to_thread(self.runner.run, batch, lambda: self._stopping)
        except Exception as exc:  # the thread machinery itself; run() catches the rest
            log.exception("batch.crashed", batch_id=batch.id)
            result = BatchResult(ok=False, error=f"internal error ({type(exc).__name__})")
        finally:
            self._running = None
        self._apply(batch, result)

    def _apply(self, batch: Batch, result: BatchResult) -> None:
        """Back on the event loop: record outcomes, charge device time, update metrics."""
        outcome = "completed" if result.ok else "canceled" if result.canceled else "failed"
        self.metrics.batches.labels(outcome).inc()
        self.metrics.inference_seconds.observe(result.run_s)
        if result.device_s > 0:
            self._avg_batch_s = 0.8 * self._avg_batch_s + 0.2 * result.device_s
        log.info("batch.finished", batch_id=batch.id, outcome=outcome,
                 run_s=round(result.run_s, 4), device_s=round(result.device_s, 4))
        for job in batch.jobs:
            job.release_inputs()
            if job.terminal:  # canceled while it ran: already charged and finished
                continue
            job.inference_s = result.run_s
            job.gpu_seconds = _share(result.device_s, job, batch)
            if result.canceled:
                self._finish(job, "failed", error="the worker is shutting down",
                             error_kind="internal")
            elif not result.ok or job.id in result.job_errors:
                self._finish(job, "failed", error_kind="internal",
                             error=result.job_errors.get(job.id, result.error))
            else:
                job.outputs = result.outputs[job.id]
                job.safety_checked, job.nsfw = result.flags[job.id]
                self._finish(job, "completed")
                self.metrics.images.inc(len(job.outputs))
                self.metrics.nsfw_images.inc(sum(job.nsfw))


def _share(seconds: float, job: Job, batch: Batch) -> float:
    """The job's part of the batch's device time: by its share of the images."""
    return round(seconds * job.spec.num_images / max(batch.images, 1), 6)
