"""What the engine is asked to do, and how it says no: the engine seam's types (no torch).

:class:`JobSpec` is one request's generation parameters with its inputs already
decoded; :class:`EngineError` and :class:`Canceled` are what an engine raises.
The HTTP side (app, queue, runner) works with these only, so it runs, and is
tested, without torch; ``worker.engine`` re-exports them next to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

__all__ = ["Canceled", "EngineError", "JobSpec", "Mode", "OutputFormat", "check_batch"]

Mode = Literal["text-to-image", "image-to-image", "inpainting"]
OutputFormat = Literal["jpeg", "png", "webp"]


class EngineError(Exception):
    """The engine cannot start: bad model folder, device or dtype. The message says why."""


class Canceled(Exception):
    """``on_step`` asked to stop; raised between denoising steps."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"canceled after step {step} of {total}")
        self.step = step
        self.total = total


@dataclass
class JobSpec:
    """One request's generation parameters, inputs already decoded (see ``worker.inputs``).

    ``seed`` must be concrete (resolve the API's ``-1`` = random before, so it
    can be reported); image ``i`` uses ``seed + i``. ``output_format`` is
    carried for the caller, who encodes with :func:`worker.images.encode`.
    """

    prompt: str
    mode: Mode
    width: int
    height: int
    steps: int
    guidance: float
    num_images: int
    seed: int
    output_format: OutputFormat
    strength: float = 0.8
    image: Image.Image | None = None
    mask: Image.Image | None = None

    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys may share one pipeline call.

        ``(mode, width, height, steps, guidance, strength)``; strength is
        ``None`` for text-to-image, which ignores it. Prompt, seed, count,
        output format and the input images may differ within a batch.
        """
        strength = None if self.mode == "text-to-image" else self.strength
        return (self.mode, self.width, self.height, self.steps, self.guidance, strength)

    def denoising_steps(self) -> int:
        """Steps the pipeline will run (``total`` in ``on_step``): all of them for
        text-to-image, the last ``strength`` share (rounded up) otherwise, as
        diffusers' ``get_timesteps`` computes it."""
        if self.mode == "text-to-image":
            return self.steps
        skipped = int(max(self.steps - min(self.steps * self.strength, self.steps), 0))
        return self.steps - skipped

    def check(self) -> None:
        """Raise ``ValueError`` for a job the pipelines cannot run."""
        if self.num_images < 1:
            raise ValueError("num_images must be at least 1")
        if self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"size must be positive, not {self.width}x{self.height}")
        if self.mode != "text-to-image":
            if self.image is None:
                raise ValueError(f"{self.mode} needs an input image")
            if not 0.0 < self.strength <= 1.0:
                raise ValueError(f"strength must be in (0, 1], not {self.strength}")
            if self.denoising_steps() < 1:
                raise ValueError(
                    f"strength {self.strength} with {self.steps} steps leaves no denoising step"
                )
        if self.mode == "inpainting" and self.mask is None:
            raise ValueError("inpainting needs a mask image")


def check_batch(jobs: list[JobSpec]) -> None:
    """Raise ``ValueError`` unless every job is runnable and all share one batch key
    (what an engine's ``run`` requires of its argument)."""
    if not jobs:
        return
    key = jobs[0].batch_key()
    for job in jobs:
        job.check()
        if job.batch_key() != key:
            raise ValueError("jobs in one run() must have equal batch keys")
