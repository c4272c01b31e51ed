"""What a simulated upstream's wire format must provide, and shared validation helpers.

`vibedream.py` and `wavespeed.py` each implement `Wire`: where the routes are, how a
submit body is validated into a `JobSpec`, and how jobs and errors are rendered as
JSON. Fault injection, timing and HTTP plumbing live in `app.py` and are shared.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from typing import Any

from .config import SimConfig
from .images import EXTENSIONS
from .jobs import Job, JobSpec

OUTPUT_FORMATS = ("jpeg", "png", "webp")
MAX_SEED = 2147483647


class WireError(ValueError):
    """The submit body is invalid: answered 400 in the wire's error shape."""


class Wire(ABC):
    name: str
    submit_path: str
    supports_sync: bool = False

    # -- routes

    @abstractmethod
    def poll_url(self, base: str, job_id: str) -> str: ...

    @abstractmethod
    def poll_id(self, path: str) -> str | None:
        """The job id when `path` is this wire's poll route, else None."""

    def new_id(self) -> str:
        return str(uuid.uuid4())

    # -- request

    @abstractmethod
    def validate(self, body: dict[str, Any], config: SimConfig) -> JobSpec:
        """Map a submit body onto a JobSpec. Raises WireError. Unknown fields are ignored."""

    # -- responses

    @abstractmethod
    def submit_body(self, job: Job, base: str, config: SimConfig) -> dict[str, Any]: ...

    @abstractmethod
    def poll_body(self, job: Job, base: str, now: float) -> dict[str, Any]: ...

    def sync_give_up_body(self, job: Job, base: str, now: float) -> dict[str, Any]:
        raise NotImplementedError(f"{self.name} has no sync mode")

    # -- billing (billing.py)

    # Whether a task that ends failed (cancelled, timeout, deleted) is charged nothing.
    refunds_failed: bool = False

    @abstractmethod
    def price_micro_usd(self, spec: JobSpec, config: SimConfig) -> int:
        """What a task of `spec` costs, fixed when it is accepted (before any refund)."""

    @abstractmethod
    def status_of(self, job: Job, now: float) -> str:
        """The task's status in this wire's words (what a poll would say)."""

    @abstractmethod
    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """Body of a non-200 answer (400, 404, 429, 5xx)."""

    def auth_error_body(self, message: str) -> dict[str, Any]:
        return self.error_body(401, message)

    @abstractmethod
    def malformed_shape_body(self) -> dict[str, Any]:
        """A 200 JSON body that parses but has the wrong shape."""


# --------------------------------------------------------------------------- helpers


def asset_url(base: str, job: Job, index: int) -> str:
    return f"{base}/assets/{job.id}/{index}.{EXTENSIONS[job.spec.output_format]}"


def prompt_of(body: dict[str, Any]) -> str:
    value = body.get("prompt")
    if not isinstance(value, str) or not value.strip():
        raise WireError("prompt is required and must be a non-empty string")
    return value


def number(
    body: dict[str, Any],
    name: str,
    default: float,
    lo: float,
    hi: float,
    *,
    integer: bool = False,
    grid: float | None = None,
) -> float:
    """A numeric field: absent or null -> default; bools and strings are rejected."""
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"{name} must be {kind} between {_fmt(lo)} and {_fmt(hi)}")
    if integer and value != int(value):
        raise WireError(f"{name} must be {kind} between {_fmt(lo)} and {_fmt(hi)}")
    if not lo <= value <= hi:
        raise WireError(f"{name} must be {kind} between {_fmt(lo)} and {_fmt(hi)}, got {value}")
    if grid is not None and abs(round(value / grid) * grid - value) > 1e-9:
        raise WireError(f"{name} must be a multiple of {grid}, got {value}")
    return int(value) if integer else float(value)


def integer(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    return int(number(body, name, default, lo, hi, integer=True))


def choice(body: dict[str, Any], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in choices:
        raise WireError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise WireError(f"{name} must be a boolean")
    return value


def optional_str(body: dict[str, Any], name: str) -> str | None:
    """An optional string field; "" and null both mean absent (the WaveSpeed example
    sends `"image": ""`)."""
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise WireError(f"{name} must be a string")
    return value


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
