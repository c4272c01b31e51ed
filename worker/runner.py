"""The device section of a batch, run in a worker thread: generate, check, encode.

Everything here blocks (the engine's pipeline call, the checker, PIL encoding); the
queue calls `BatchRunner.run` through `asyncio.to_thread` and applies the
`BatchResult` back on the event loop. `Engine` and `Checker` are the seams:
`worker.engine.FluxEngine` and `worker.safety`'s checkers in production,
`worker.testing.FakeEngine` / `FakeChecker` in tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from common.logging import get_logger

from .jobs import Batch, Job
from .spec import Canceled, EngineError, JobSpec

log = get_logger("flux_worker.runner")

StepCallback = Callable[[int, int], bool]
Encoder = Callable[[Image.Image, Any], bytes]  # (image, output format) -> bytes
PolicyFn = Callable[[list[Image.Image], list[bool], Any], list[Image.Image]]  # + policy


class Engine(Protocol):
    def run(self, jobs: list[JobSpec], *, on_step: StepCallback | None = None
            ) -> list[list[Image.Image]]: ...
    def device_info(self) -> dict[str, Any]: ...


class Checker(Protocol):
    def check(self, images: list[Image.Image]) -> list[bool]: ...


@dataclass
class BatchResult:
    """What the worker thread hands back to the event loop."""

    ok: bool
    run_s: float = 0.0  # the pipeline call
    device_s: float = 0.0  # the call + safety check + encoding: what is billed
    outputs: dict[str, list[bytes]] = field(default_factory=dict)
    flags: dict[str, tuple[bool, list[bool]]] = field(default_factory=dict)  # (checked, flags)
    job_errors: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    canceled: bool = False


class BatchRunner:
    def __init__(self, engine: Engine, *, encode: Encoder, checker: Checker | None = None,
                 apply_policy: PolicyFn | None = None, nsfw_policy: str = "flag") -> None:
        self.engine = engine
        self._encode = encode
        self._checker = checker
        self._apply_policy = apply_policy
        self._policy = nsfw_policy

    def run(self, batch: Batch, stopping: Callable[[], bool]) -> BatchResult:
        """One pipeline call for the batch; stops between steps when every job in it
        is canceled or ``stopping()`` says the worker is shutting down."""

        def on_step(step: int, total: int) -> bool:
            for job in batch.jobs:
                job.step, job.total = step, total
            return not stopping() and not all(job.cancel_requested for job in batch.jobs)

        try:
            images = self.engine.run([job.spec for job in batch.jobs], on_step=on_step)
        except Canceled:
            elapsed = time.perf_counter() - batch.started
            return BatchResult(ok=False, canceled=True, run_s=elapsed, device_s=elapsed)
        except Exception as exc:
            log.exception("batch.failed", batch_id=batch.id)
            elapsed = time.perf_counter() - batch.started
            return BatchResult(ok=False, error=describe(exc), run_s=elapsed, device_s=elapsed)
        result = BatchResult(ok=True, run_s=time.perf_counter() - batch.started)
        for job, job_images in zip(batch.jobs, images, strict=True):
            if job.cancel_requested:
                continue  # canceled while it ran: its images are dropped
            try:
                result.outputs[job.id], result.flags[job.id] = self._finish(job, job_images)
            except Exception as exc:
                log.exception("job.postprocess_failed", job_id=job.id, batch_id=batch.id)
                result.job_errors[job.id] = describe(exc)
        result.device_s = time.perf_counter() - batch.started
        return result

    def _finish(self, job: Job, images: list[Image.Image]
                ) -> tuple[list[bytes], tuple[bool, list[bool]]]:
        """Safety check (when the job asked and a checker is configured), policy, encode."""
        checked = job.safety and self._checker is not None
        flags = [False] * len(images)
        if checked and self._checker is not None:
            flags = [bool(f) for f in self._checker.check(images)]
            if len(flags) != len(images):
                raise ValueError(f"the safety checker gave {len(flags)} flags for "
                                 f"{len(images)} images")
            if self._apply_policy is not None:
                images = self._apply_policy(images, flags, self._policy)
        return [self._encode(img, job.output_format) for img in images], (checked, flags)


def describe(exc: Exception) -> str:
    """A client-safe message: the engine's own checks say what went wrong, others only
    their type (details go to the log)."""
    if "out of memory" in str(exc).lower():
        return "the GPU ran out of memory"
    if isinstance(exc, (EngineError, ValueError)):
        return str(exc) or "generation failed"
    return f"internal error ({type(exc).__name__})"
