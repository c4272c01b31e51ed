"""WaveSpeed's wire format, per /work/shared/seeds/wavespeed-flux-dev.txt.

Submit: `POST /api/v3/wavespeed-ai/flux-dev`; poll: `GET /api/v3/predictions/{id}/result`.
Both answer 200 `{code: 200, message: "success", data: {id, model, outputs, urls: {get},
has_nsfw_contents, status, created_at, error, timings: {inference}}}`.

Known behaviour beyond the seed, simulated here:
- a failed task is still HTTP 200: `data.status` is "failed" (or "cancelled", "timeout",
  "deleted"), `data.error` says why, and `data.code` is numeric: 1200 content
  moderation, 1400/1401 bad parameter, 1402 media access failed, 5000/5003 internal /
  unavailable. `data.code` is present only on such answers (and the sync give-up);
- `enable_sync_mode` holds the submit until the task is terminal and answers with it;
  past `sync_give_up_s` it answers 200 with `data.status` "processing" and `data.code`
  5004 (the task goes on and a later poll returns it);
- `enable_base64_output` puts plain base64 strings (no `data:` prefix) in `outputs`;
- `has_nsfw_contents` has one bool per output once completed, and is [] before;
- billing (the `/_sim/billing` log): `price_micro_usd_per_image` x images per task (the
  seed states no price; the default is the list price the proxy's adapter assumes), and
  nothing for a task that ends failed, cancelled, timeout or deleted.
Where even that is silent (our choice): submit validation errors are 400
`{code: 400, message, data: null}`, an unknown id is 404 `{code: 404, message, data:
null}`, 429 / 5xx use the same envelope, and a bad key is 401 `{code: 401, message}`.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from .config import SimConfig
from .images import render_base64
from .jobs import CODE_SYNC_TIMEOUT, Job, JobSpec
from .wire import (
    MAX_SEED,
    OUTPUT_FORMATS,
    Wire,
    WireError,
    asset_url,
    boolean,
    choice,
    integer,
    number,
    optional_str,
    prompt_of,
)

MODEL = "wavespeed-ai/flux-dev"
MIN_SIDE, MAX_SIDE = 256, 1536
_SIZE = re.compile(r"^\s*(\d{1,5})\s*\*\s*(\d{1,5})\s*$")
_POLL_PREFIX = "/api/v3/predictions/"
_POLL_SUFFIX = "/result"

_CODE_ERRORS = {
    1200: "The content was flagged by the content moderation system. Please modify your prompt.",
    1400: "Invalid parameters.",
    1401: "Parameter validation failed.",
    1402: "Failed to access the input media.",
    5000: "Internal server error, please retry.",
    5003: "Service temporarily unavailable, please retry later.",
}
_STATUS_ERRORS = {
    "cancelled": "Task cancelled.",
    "timeout": "Task timed out.",
    "deleted": "Task deleted.",
}
SYNC_TIMEOUT_ERROR = (
    "Sync mode timed out; the task is still processing. Query the result URL later."
)


class WaveSpeedWire(Wire):
    name = "wavespeed"
    submit_path = "/api/v3/wavespeed-ai/flux-dev"
    supports_sync = True

    def poll_url(self, base: str, job_id: str) -> str:
        return f"{base}{_POLL_PREFIX}{job_id}{_POLL_SUFFIX}"

    def poll_id(self, path: str) -> str | None:
        if not (path.startswith(_POLL_PREFIX) and path.endswith(_POLL_SUFFIX)):
            return None
        job_id = path[len(_POLL_PREFIX) : -len(_POLL_SUFFIX)]
        return job_id if job_id and "/" not in job_id else None

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def validate(self, body: dict[str, Any], config: SimConfig) -> JobSpec:
        prompt = prompt_of(body)
        optional_str(body, "image")
        optional_str(body, "mask_image")
        number(body, "strength", 0.8, 0.0, 1.0)
        width, height = _size(body.get("size"))
        integer(body, "num_inference_steps", 28, 1, 50)
        seed = integer(body, "seed", -1, -1, MAX_SEED)
        number(body, "guidance_scale", 3.5, 1.0, 20.0)
        num_images = integer(body, "num_images", 1, 1, 4)
        output_format = choice(body, "output_format", "jpeg", OUTPUT_FORMATS)
        return JobSpec(
            prompt=prompt,
            width=width,
            height=height,
            num_images=num_images,
            seed=seed,
            output_format=output_format,
            safety_checker=boolean(body, "enable_safety_checker", True),
            base64_output=boolean(body, "enable_base64_output", False),
            sync=boolean(body, "enable_sync_mode", False),
        )

    refunds_failed = True  # WaveSpeed does not bill failed tasks

    def price_micro_usd(self, spec: JobSpec, config: SimConfig) -> int:
        return config.price_micro_usd_per_image * spec.num_images

    def status_of(self, job: Job, now: float) -> str:
        phase = job.phase(now)
        if phase == "queued":
            return "created"
        if phase == "running":
            return "processing"
        return "completed" if job.failure is None else job.failure.status

    def submit_body(self, job: Job, base: str, config: SimConfig) -> dict[str, Any]:
        # The asynchronous submit answers before any work: always "created".
        return _envelope(self._data(job, base, "created"))

    def poll_body(self, job: Job, base: str, now: float) -> dict[str, Any]:
        phase = job.phase(now)
        if phase == "queued":
            return _envelope(self._data(job, base, "created"))
        if phase == "running":
            return _envelope(self._data(job, base, "processing"))
        failure = job.failure
        if failure is None:
            return _envelope(self._completed(job, base))
        error = _STATUS_ERRORS.get(failure.status) or _CODE_ERRORS.get(
            failure.code or 0, _CODE_ERRORS[5000]
        )
        data = self._data(job, base, failure.status, error=error, code=failure.code)
        return _envelope(data)

    def sync_give_up_body(self, job: Job, base: str, now: float) -> dict[str, Any]:
        data = self._data(job, base, "processing", error=SYNC_TIMEOUT_ERROR, code=CODE_SYNC_TIMEOUT)
        return _envelope(data)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"code": status, "message": message, "data": None}

    def auth_error_body(self, message: str) -> dict[str, Any]:
        return {"code": 401, "message": message}

    def malformed_shape_body(self) -> dict[str, Any]:
        return {"code": 200, "message": "success", "data": [{"task": None}]}

    # -- data object

    def _data(
        self, job: Job, base: str, status: str, *, error: str = "", code: int | None = None
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": job.id,
            "model": MODEL,
            "outputs": [],
            "urls": {"get": self.poll_url(base, job.id)},
            "has_nsfw_contents": [],
            "status": status,
            "created_at": job.created_iso,
            "error": error,
            "timings": {"inference": 0},
        }
        if code is not None:
            data["code"] = code
        return data

    def _completed(self, job: Job, base: str) -> dict[str, Any]:
        spec = job.spec
        data = self._data(job, base, "completed")
        if spec.base64_output:
            data["outputs"] = [
                render_base64(job.seed, i, spec.width, spec.height, spec.output_format)
                for i in range(spec.num_images)
            ]
        else:
            data["outputs"] = [asset_url(base, job, i) for i in range(spec.num_images)]
        data["has_nsfw_contents"] = list(job.nsfw)
        data["timings"] = {"inference": int(job.latency_s * 1000)}
        return data


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {"code": 200, "message": "success", "data": data}


def _size(value: object) -> tuple[int, int]:
    if value is None:
        return 1024, 1024
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise WireError(f"size must be 'width*height', got {value!r}")
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise WireError(
                f"size {width}*{height} is out of range: {MIN_SIDE} ~ {MAX_SIDE} per dimension"
            )
    return width, height
