"""Test doubles of the engine seam: the worker without torch, a GPU or a model.

:class:`FakeEngine` implements :class:`worker.runner.Engine` the way
:class:`worker.engine.FluxEngine` behaves at its edges: it validates the batch
as the real engine does (``ValueError`` for an unrunnable job or mixed batch
keys), reports every "denoising step" through ``on_step`` (``total`` as the
real pipelines count it, fewer for image-to-image and inpainting) and stops
with :class:`worker.spec.Canceled` when ``on_step`` returns ``False``, takes
``step_s`` seconds per step, and returns one solid-colour image per requested
image, of the requested size, whose colour depends only on ``seed + i``
(:func:`fake_color`), so a seed reproduces its image whatever shares the batch.
It can be told to fail (any exception, e.g. an :class:`~worker.spec.EngineError`
or a CUDA out-of-memory ``RuntimeError``), at the start or after some steps.

:class:`FakeChecker` implements :class:`worker.runner.Checker`.

Use them with the real app, queue and runner::

    app = create_worker_app(WorkerSettings(safety_checker="none", warmup=False),
                            engine=FakeEngine(step_s=0.01))
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .spec import Canceled, JobSpec, Mode, check_batch

__all__ = ["FakeChecker", "FakeEngine", "SeenInputs", "fake_color"]


def fake_color(seed: int, index: int = 0) -> tuple[int, int, int]:
    """The colour of image ``index`` of a job with ``seed`` (depends on ``seed + index``)."""
    digest = hashlib.blake2b(str(seed + index).encode(), digest_size=3).digest()
    return digest[0], digest[1], digest[2]


@dataclass(frozen=True)
class SeenInputs:
    """What a job handed the engine besides its parameters (the queue drops the input
    images once the batch is done, so the engine keeps a note)."""

    image_size: tuple[int, int] | None
    mask_size: tuple[int, int] | None
    strength: float


class FakeEngine:
    """The engine seam without torch (see the module doc).

    ``step_s``: seconds per denoising step (``time.sleep``: the call runs in the
    queue's worker thread, as the real one does). ``fail``: raised by every
    call, after ``fail_after_steps`` steps (0: before the first). Calls are
    serialised, as on the real engine.
    """

    def __init__(self, *, step_s: float = 0.0, fail: BaseException | None = None,
                 fail_after_steps: int = 0) -> None:
        self.step_s = step_s
        self.fail = fail
        self.fail_after_steps = fail_after_steps
        self.calls: list[list[JobSpec]] = []  # every run(), in order
        self.stopped_at: list[tuple[int, int]] = []  # (step, total) of canceled calls
        self.inputs: dict[Mode, SeenInputs] = {}  # the latest job of each mode
        self._lock = threading.Lock()

    @property
    def images_generated(self) -> int:
        return sum(job.num_images for call in self.calls for job in call)

    def run(self, jobs: list[JobSpec], *, on_step: Callable[[int, int], bool] | None = None
            ) -> list[list[Image.Image]]:
        check_batch(jobs)
        if not jobs:
            return []
        with self._lock:
            self.calls.append(list(jobs))
            for job in jobs:
                self.inputs[job.mode] = SeenInputs(
                    image_size=job.image.size if job.image is not None else None,
                    mask_size=job.mask.size if job.mask is not None else None,
                    strength=job.strength)
            total = jobs[0].denoising_steps()
            for step in range(1, total + 1):
                if self.fail is not None and step > self.fail_after_steps:
                    raise self.fail
                if self.step_s > 0:
                    time.sleep(self.step_s)
                if on_step is not None and on_step(step, total) is False:
                    self.stopped_at.append((step, total))
                    raise Canceled(step, total)
            if self.fail is not None:
                raise self.fail
            return [[Image.new("RGB", (job.width, job.height), fake_color(job.seed, i))
                     for i in range(job.num_images)] for job in jobs]

    def warmup(self) -> None:
        """What the real engine's warm-up is to it: nothing to do here."""

    def device_info(self) -> dict[str, Any]:
        return {"device": "fake", "dtype": "fp32"}


class FakeChecker:
    """Flags every image (``flag_everything``) or none, and counts what it saw."""

    def __init__(self, *, flag_everything: bool = True) -> None:
        self.flag_everything = flag_everything
        self.seen = 0

    def check(self, images: list[Image.Image]) -> list[bool]:
        self.seen += len(images)
        return [self.flag_everything] * len(images)
