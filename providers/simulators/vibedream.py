"""VibeDream's wire format, per /work/shared/seeds/vibedream-flux-dev.txt.

Submit: `POST /api/v1/models/flux-dev/generate` -> 200
`{id, status: "processing", statusUrl, estimatedTime, costCents, createdAt}`.
Poll: `GET /api/v1/predictions/{id}` ->
`{id, modelId, modelName, status: processing|completed|failed, outputs, error,
createdAt, completedAt}`.

Where the seed is silent (chosen to look like the real service, and said so here):
- error answers (400 invalid input, 401 bad key, 404 unknown id, 429, 5xx) are
  `{"error": "<message>"}`; the seed documents no error shape at all;
- the value grids of the schema table (strength step 0.1, guidance step 0.5) are
  treated as UI hints and not enforced unless `SimConfig.strict_steps`;
- `image` / `mask_image` must be public http(s) URLs ("Pass a public image URL");
- there is no sync mode, no base64 output and no NSFW flag: those request fields are
  ignored like any other unknown field;
- terminal statuses other than completed (WaveSpeed's cancelled/timeout/deleted, which
  directives can ask for) are reported as `failed`, since the seed lists only three;
- billing (the `/_sim/billing` log): the quoted `costCents` is charged even when the job
  then fails, since the seed quotes it at submit and says nothing of refunds;
- `estimatedTime` is this job's own latency as a range, like the seed's "5-15s"
  (`estimated_time`: a 5 s job says "5-15s", a 0.05 s one "0-1s"), so a client that
  waits for its low end waits no longer than the job takes.
"""

from __future__ import annotations

import math
from typing import Any

from .billing import MICRO_USD_PER_CENT
from .config import SimConfig
from .jobs import Job, JobSpec
from .wire import (
    MAX_SEED,
    OUTPUT_FORMATS,
    Wire,
    WireError,
    asset_url,
    choice,
    integer,
    number,
    optional_str,
    prompt_of,
)

SIZES = ("512*512", "768*768", "1024*1024", "1024*768", "768*1024", "1280*720", "720*1280")
MODERATION_ERROR = "Your request was flagged by content moderation. Please modify your prompt."

# Messages for failures that are not moderation (wording is ours; the seed shows only
# the moderation one).
_FAILURE_ERRORS = {
    1400: "Invalid input parameters.",
    1401: "Invalid input parameters.",
    1402: "Failed to download the input image.",
    5003: "The model is temporarily unavailable. Please try again later.",
}
_STATUS_ERRORS = {
    "cancelled": "The prediction was cancelled.",
    "timeout": "The prediction timed out.",
    "deleted": "The prediction was deleted.",
}
_GENERIC_ERROR = "Generation failed due to an internal error. Please try again."

_POLL_PREFIX = "/api/v1/predictions/"


class VibeDreamWire(Wire):
    name = "vibedream"
    submit_path = "/api/v1/models/flux-dev/generate"
    supports_sync = False

    def poll_url(self, base: str, job_id: str) -> str:
        return f"{base}{_POLL_PREFIX}{job_id}"

    def poll_id(self, path: str) -> str | None:
        if not path.startswith(_POLL_PREFIX):
            return None
        job_id = path[len(_POLL_PREFIX) :]
        return job_id if job_id and "/" not in job_id else None

    def validate(self, body: dict[str, Any], config: SimConfig) -> JobSpec:
        prompt = prompt_of(body)
        for name in ("image", "mask_image"):
            url = optional_str(body, name)
            if url is not None and not url.startswith(("http://", "https://")):
                raise WireError(f"{name} must be a public image URL")
        strict = config.strict_steps
        number(body, "strength", 0.8, 0.0, 1.0, grid=0.1 if strict else None)
        size = choice(body, "size", "1024*1024", SIZES)
        integer(body, "num_inference_steps", 28, 1, 50)
        number(body, "guidance_scale", 3.5, 1.0, 20.0, grid=0.5 if strict else None)
        num_images = integer(body, "num_images", 1, 1, 4)
        seed = integer(body, "seed", -1, -1, MAX_SEED)
        output_format = choice(body, "output_format", "jpeg", OUTPUT_FORMATS)
        width, height = (int(side) for side in size.split("*"))
        return JobSpec(
            prompt=prompt,
            width=width,
            height=height,
            num_images=num_images,
            seed=seed,
            output_format=output_format,
            safety_checker=False,  # VibeDream reports no NSFW flags
        )

    def submit_body(self, job: Job, base: str, config: SimConfig) -> dict[str, Any]:
        return {
            "id": job.id,
            "status": "processing",
            "statusUrl": self.poll_url(base, job.id),
            "estimatedTime": estimated_time(job.latency_s),
            "costCents": config.cost_cents * job.spec.num_images,
            "createdAt": job.created_iso,
        }

    def price_micro_usd(self, spec: JobSpec, config: SimConfig) -> int:
        # The costCents quoted at submit (the whole job), billed even if the job fails.
        return config.cost_cents * spec.num_images * MICRO_USD_PER_CENT

    def status_of(self, job: Job, now: float) -> str:
        if job.phase(now) != "done":
            return "processing"
        return "completed" if job.failure is None else "failed"

    def poll_body(self, job: Job, base: str, now: float) -> dict[str, Any]:
        done = job.phase(now) == "done"
        outputs: list[str] | None = None
        error: str | None = None
        if not done:
            status = "processing"
        elif job.failure is None:
            status = "completed"
            outputs = [asset_url(base, job, i) for i in range(job.spec.num_images)]
        else:
            status = "failed"
            error = _error_for(job)
        return {
            "id": job.id,
            "modelId": "flux-dev",
            "modelName": "FLUX.1 Dev",
            "status": status,
            "outputs": outputs,
            "error": error,
            "createdAt": job.created_iso,
            "completedAt": job.completed_iso if done else None,
        }

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": message}

    def malformed_shape_body(self) -> dict[str, Any]:
        return {"success": True, "result": {"prediction": None}, "outputs": "pending"}


def _error_for(job: Job) -> str:
    failure = job.failure
    assert failure is not None
    if failure.policy:
        return MODERATION_ERROR
    if failure.status in _STATUS_ERRORS:
        return _STATUS_ERRORS[failure.status]
    return _FAILURE_ERRORS.get(failure.code or 0, _GENERIC_ERROR)


def estimated_time(latency_s: float) -> str:
    """A job's latency as VibeDream words its estimate: whole seconds, low-high,
    the low end at most the latency (the seed's example: "5-15s")."""
    low = max(0, math.floor(latency_s))
    return f"{low}-{max(low + 1, math.ceil(latency_s * 3))}s"
