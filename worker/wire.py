"""The worker's JSON wire format: parse and validate a job request, render a job.

Validation errors carry ``{field, value, reason, allowed}`` like the proxy's 422.
Sizes: any integer side from 64 to 1536. FLUX needs multiples of 16 (VAE factor 8
x 2x2 latent packing); the engine generates at the nearest multiple of 16 and
resizes back, so the delivered image always has the requested size. Unknown
body fields are refused (a typo such as ``steps`` must not silently default).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal, cast

from .jobs import Job

OutputFormat = Literal["jpeg", "png", "webp"]
OutputMode = Literal["url", "base64"]
MIN_SIDE, MAX_SIDE = 64, 1536
MAX_STEPS, MAX_IMAGES = 50, 4
MAX_SEED = 2_147_483_647
MAX_PROMPT_CHARS = 20_000
FORMATS = ("jpeg", "png", "webp")
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

ALLOWED: dict[str, str] = {
    "prompt": f"a non-empty string of at most {MAX_PROMPT_CHARS} characters",
    "image": "an http(s) URL or a data:image/...;base64 URI",
    "mask_image": "an http(s) URL or a data:image/...;base64 URI, together with image",
    "strength": "a number above 0 and at most 1",
    "width": f"an integer from {MIN_SIDE} to {MAX_SIDE}",
    "height": f"an integer from {MIN_SIDE} to {MAX_SIDE}",
    "num_inference_steps": f"an integer from 1 to {MAX_STEPS}",
    "guidance_scale": "a number from 0 to 20",
    "num_images": f"an integer from 1 to {MAX_IMAGES}",
    "seed": f"an integer from -1 to {MAX_SEED} (-1 or null: random)",
    "output_format": "one of jpeg, png, webp",
    "enable_safety_checker": "true or false",
    "output": "url or base64",
}


@dataclass(frozen=True, slots=True)
class JobRequest:
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    num_images: int
    seed: int | None  # None: draw one
    output_format: OutputFormat
    safety: bool
    output: OutputMode
    strength: float = 0.8
    image: str | None = None
    mask_image: str | None = None

    @property
    def mode(self) -> Literal["text-to-image", "image-to-image", "inpainting"]:
        if self.mask_image:
            return "inpainting"
        return "image-to-image" if self.image else "text-to-image"


class InvalidRequest(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['reason']}" for e in errors))
        self.errors = errors


def field_error(field: str, reason: str, value: Any = None) -> dict[str, Any]:
    return {"field": field, "value": _preview(value), "reason": reason,
            "allowed": ALLOWED.get(field)}


def _preview(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 120:
        return value[:100] + f"... ({len(value)} characters)"
    return value


class _Reader:
    """Reads typed fields from the body, collecting every error before raising."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.errors: list[dict[str, Any]] = []

    def fail(self, name: str, reason: str, value: Any) -> None:
        self.errors.append(field_error(name, reason, value))

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, "must be an integer", value)
            return lo
        if not lo <= value <= hi:
            self.fail(name, f"must be from {lo} to {hi}", value)
            return lo
        return value

    def number(self, name: str, default: float, lo: float, hi: float, *,
               lo_open: bool = False) -> float:
        value = self.body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(name, "must be a number", value)
            return default
        if value != value or not (lo < value if lo_open else lo <= value) or value > hi:
            self.fail(name, f"must be {'above' if lo_open else 'from'} {lo} "
                      f"{'and at most' if lo_open else 'to'} {hi}", value)
            return default
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.body.get(name, default)
        if not isinstance(value, bool):
            self.fail(name, "must be true or false", value)
            return default
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.body.get(name, default)
        if value not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}", value)
            return default
        return str(value)

    def image_ref(self, name: str) -> str | None:
        value = self.body.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            self.fail(name, "must be a string (URL or data URI)", value)
            return None
        return value


def parse_job_request(body: Any) -> JobRequest:
    """A decoded JSON body -> JobRequest, or InvalidRequest listing every problem."""
    if not isinstance(body, dict):
        raise InvalidRequest([field_error("body", "must be a JSON object", type(body).__name__)])
    r = _Reader(body)
    for name in sorted(set(body) - set(ALLOWED)):
        r.fail(name, "unknown field", body[name])
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        r.fail("prompt", "must be a non-empty string of at most "
               f"{MAX_PROMPT_CHARS} characters", prompt)
        prompt = ""
    width = r.integer("width", 1024, MIN_SIDE, MAX_SIDE)
    height = r.integer("height", 1024, MIN_SIDE, MAX_SIDE)
    steps = r.integer("num_inference_steps", 28, 1, MAX_STEPS)
    guidance = r.number("guidance_scale", 3.5, 0.0, 20.0)
    num_images = r.integer("num_images", 1, 1, MAX_IMAGES)
    seed_value = body.get("seed")
    seed = None if seed_value is None or seed_value == -1 else r.integer("seed", 0, 0, MAX_SEED)
    fmt = r.choice("output_format", "jpeg", FORMATS)
    safety = r.boolean("enable_safety_checker", True)
    output = r.choice("output", "url", ("url", "base64"))
    strength = r.number("strength", 0.8, 0.0, 1.0, lo_open=True)
    image = r.image_ref("image")
    mask = r.image_ref("mask_image")
    if mask is not None and image is None:
        r.fail("mask_image", "needs image (inpainting edits an image)", _preview(mask))
    if image is not None and int(steps * strength) < 1 and not r.errors:
        r.fail("strength", f"strength x num_inference_steps must be at least 1 "
               f"(here {strength} x {steps})", strength)
    if r.errors:
        raise InvalidRequest(r.errors)
    return JobRequest(prompt=prompt, width=width, height=height, steps=steps, guidance=guidance,
                      num_images=num_images, seed=seed, output_format=cast(OutputFormat, fmt),
                      safety=safety, output=cast(OutputMode, output), strength=strength,
                      image=image, mask_image=mask)


# --------------------------------------------------------------------------- responses


def output_name(job: Job, index: int) -> str:
    return f"{index}.{EXTENSIONS.get(job.output_format, job.output_format)}"


def render_job(job: Job, *, base_url: str, output: str, position: int | None) -> dict[str, Any]:
    """GET /v1/jobs/{id}. ``base_url``: where clients reach this worker (output URLs)."""
    mime = MIME.get(job.output_format, "application/octet-stream")
    if output == "base64":
        outputs = [f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
                   for data in job.outputs]
    else:
        outputs = [f"{base_url}/v1/jobs/{job.id}/outputs/{output_name(job, i)}"
                   for i in range(len(job.outputs))]
    queue_ms = inference_ms = None
    if job.started_at is not None:
        queue_ms = round((job.started_at - job.created_at) * 1000, 1)
    elif job.finished_at is not None:
        queue_ms = round((job.finished_at - job.created_at) * 1000, 1)
    if job.inference_s is not None:
        inference_ms = round(job.inference_s * 1000, 1)
    return {
        "id": job.id,
        "status": job.status,
        "queue_position": position,
        "progress": {"step": job.step, "total": job.total},
        "outputs": outputs,
        "output_format": job.output_format,
        "has_nsfw_contents": list(job.nsfw) if job.status == "completed" else [],
        "safety_checked": job.safety_checked,
        "seed": job.spec.seed,
        "size": {"width": job.spec.width, "height": job.spec.height},
        "timings": {"queue_ms": queue_ms, "inference_ms": inference_ms},
        "gpu_seconds": job.gpu_seconds,
        "batch": ({"id": job.batch_id, "size": job.batch_size, "images": job.batch_images}
                  if job.batch_id else None),
        "error": job.error,
        "error_kind": job.error_kind,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }
