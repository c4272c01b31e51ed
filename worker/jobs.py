"""A job's record: what was asked, where it is, what came out, what it cost."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Literal

from .spec import JobSpec

JobStatus = Literal["queued", "running", "completed", "failed", "canceled"]
ErrorKind = Literal["invalid_input", "internal"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "canceled"})


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(eq=False)
class Job:
    id: str
    spec: JobSpec
    safety: bool  # the client asked for the NSFW check
    created_at: float  # time.time() of every *_at field
    output: str = "url"  # how the client wants outputs rendered: url | base64
    status: JobStatus = "queued"
    step: int = 0  # denoising steps done, of `total`
    total: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    outputs: list[bytes] = field(default_factory=list)  # encoded, in output_format
    output_format: str = "jpeg"
    nsfw: list[bool] = field(default_factory=list)  # one flag per output
    safety_checked: bool = False
    error: str | None = None
    error_kind: ErrorKind | None = None
    batch_id: str | None = None
    batch_size: int = 0  # jobs in the pipeline call
    batch_images: int = 0  # images in the pipeline call
    inference_s: float | None = None  # wall time of the pipeline call
    gpu_seconds: float | None = None  # device time charged to this job (see queue.py)
    cancel_requested: bool = False  # read by the worker thread between steps
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def expected_steps(self) -> int:
        """Denoising steps the pipeline will run (img2img/inpaint: steps x strength)."""
        if self.spec.mode == "text-to-image":
            return int(self.spec.steps)
        return max(1, int(self.spec.steps * self.spec.strength))

    def release_inputs(self) -> None:
        """Drop the decoded input images once they are no longer needed (memory)."""
        self.spec.image = self.spec.mask = None


@dataclass(eq=False)
class Batch:
    """Jobs sharing one pipeline call."""

    id: str
    jobs: list[Job]
    images: int
    started: float = 0.0  # perf_counter when the batch took the device
