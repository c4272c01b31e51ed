"""VibeDream FLUX.1 [dev]: asynchronous submit, then poll (seed: vibedream-flux-dev.txt).

    POST {base}/api/v1/models/flux-dev/generate   -> {id, status, statusUrl, costCents, ...}
    GET  {base}/api/v1/predictions/{id}           -> {id, status, outputs, error, ...}

No sync mode, no base64, no NSFW flags, no cancel endpoint: the proxy emulates
what it needs. Images must be public URLs. Outputs live on assets.vibedream.ai.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field

from common import media

from . import _http
from .base import (
    Capabilities,
    ErrorKind,
    GenerationRequest,
    JobStatus,
    MalformedResponse,
    ProviderSettings,
    UpstreamJob,
)

SUBMIT_PATH = "/api/v1/models/flux-dev/generate"
POLL_PATH = "/api/v1/predictions/{id}"
MICRO_USD_PER_CENT = 10_000

SIZES = frozenset(
    {(512, 512), (768, 768), (1024, 1024), (1024, 768), (768, 1024), (1280, 720), (720, 1280)}
)

CAPABILITIES = Capabilities(
    sizes=SIZES,
    max_num_images=4,
    img2img=True,
    inpainting=True,
    native_sync=False,
    native_base64=False,
    native_nsfw_flags=False,
    requires_public_image_urls=True,  # seed: "Pass a public image URL"
    cancel=False,
)


class VibeDreamSettings(ProviderSettings):
    base_url: str = "https://api.vibedream.ai"
    asset_hosts: list[str] = Field(default_factory=lambda: ["assets.vibedream.ai"])
    # Used only when a submit answer carries no costCents (seed: "from $0.02/run").
    fallback_cost_cents_per_image: int = Field(default=2, ge=0)
    # The seed quotes costCents at submit and says nothing of refunds: assume a
    # failed job is still billed until VibeDream says otherwise.
    refunds_failed: bool = False


# --------------------------------------------------------------------------- wire shapes


class _Submitted(BaseModel):
    """Only `id` is required: once a task exists, a garbled extra field must not
    lose it (statusUrl falls back to the seed's path, costCents to the list price)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    id: str = Field(min_length=1)
    status: Any = "processing"
    status_url: Any = Field(default=None, alias="statusUrl")
    cost_cents: Any = Field(default=None, alias="costCents")
    estimated_time: Any = Field(default=None, alias="estimatedTime")


class _Prediction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)
    status: str
    outputs: list[str] | None = None
    error: str | None = None


_STATUS = {
    "processing": JobStatus.PROCESSING,
    # Not in the seed; the usual queue words, taken as "not done yet".
    "queued": JobStatus.PROCESSING,
    "pending": JobStatus.PROCESSING,
    "starting": JobStatus.PROCESSING,
    "completed": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    "canceled": JobStatus.CANCELED,
    "cancelled": JobStatus.CANCELED,
}


# --------------------------------------------------------------------------- provider


class VibeDreamProvider(_http.HTTPProvider):
    capabilities = CAPABILITIES

    def __init__(
        self,
        name: str,
        settings: VibeDreamSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        guard: media.OutboundGuard | None = None,
    ) -> None:
        super().__init__(name, settings, transport=transport, guard=guard)
        self.settings: VibeDreamSettings = settings

    # -- map request

    def _body(self, req: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": req.prompt}
        if req.image:
            body["image"] = req.image
            if req.mask_image:
                body["mask_image"] = req.mask_image
            body["strength"] = req.strength
        body.update(
            size=req.size,
            num_inference_steps=req.num_inference_steps,
            guidance_scale=req.guidance_scale,
            num_images=req.num_images,
            seed=req.seed,
            output_format=req.output_format,
        )
        return body

    # -- call, map response

    async def submit(self, req: GenerationRequest) -> UpstreamJob:
        # The seed: the submit "returns immediately"; an answer slower than
        # submit_timeout_s means a hung upstream (outcome unknown), not a busy one.
        s = self.settings
        data = await _http.call(
            self._client,
            "POST",
            SUBMIT_PATH,
            provider=self.name,
            op="submit",
            secret=self._secret,
            urls=self._urls,
            json_body=self._body(req),
            http_timeout=_http.submit_timeout(s),
            answer_s=s.submit_timeout_s,
            total_s=s.total_timeout_s,
        )
        sub = _http.parse_model(self.name, "submit", _Submitted, data)
        status_url = sub.status_url if isinstance(sub.status_url, str) else None
        return UpstreamJob(
            upstream_id=sub.id,
            status=JobStatus.PROCESSING,  # the seed: "returns immediately"; poll for the rest
            poll_url=self._poll_url(sub.id, status_url),
            charged_micro_usd=_micro_usd(sub.cost_cents),
            raw_status=str(sub.status),
            ready_after_s=ready_after_s(sub.estimated_time, limit_s=s.deadline_s),
        )

    async def poll(self, job: UpstreamJob) -> UpstreamJob:
        data = await _http.call(
            self._client,
            "GET",
            self._poll_url(job.upstream_id, job.poll_url),
            provider=self.name,
            op="poll",
            secret=self._secret,
            urls=self._urls,
            total_s=self.settings.total_timeout_s,
        )
        pred = _http.parse_model(self.name, "poll", _Prediction, data)
        if pred.id != job.upstream_id:  # never hand one job's images to another
            raise MalformedResponse(f"{self.name}: poll answered another job", provider=self.name)
        status = _STATUS.get(pred.status.lower())
        if status is None:
            raise MalformedResponse(
                f"{self.name}: poll answered unknown status {_http.safe_text(pred.status)!r}",
                provider=self.name,
            )
        out = UpstreamJob(
            upstream_id=job.upstream_id,
            status=status,
            poll_url=job.poll_url,
            charged_micro_usd=job.charged_micro_usd,  # quoted at submit only
            raw_status=pred.status,
        )
        if status is JobStatus.COMPLETED:
            if not pred.outputs:
                raise MalformedResponse(
                    f"{self.name}: poll answered completed without outputs", provider=self.name
                )
            out.outputs = list(pred.outputs)
        elif status is JobStatus.FAILED:
            out.error = _http.safe_text(pred.error, self._secret) or "generation failed"
            # The seed's one failure text is a moderation refusal; anything else
            # is taken as an upstream fault another provider may not have.
            out.error_kind = (
                ErrorKind.POLICY
                if _http.looks_like_policy_refusal(pred.error)
                else ErrorKind.UNAVAILABLE
            )
        return out

    async def cancel(self, job: UpstreamJob) -> bool:
        return False  # the seed has no cancel endpoint

    # -- cost

    def attempt_cost_micro_usd(self, req: GenerationRequest, job: UpstreamJob | None) -> int:
        """costCents as quoted at submit. With no answer to the submit (job None,
        outcome unknown) the task may exist and be billed: charge what it would
        cost (num_images x fallback) rather than nothing -- conservative."""
        expected = req.num_images * self.settings.fallback_cost_cents_per_image * MICRO_USD_PER_CENT
        if job is None:
            return expected
        if job.status in (JobStatus.FAILED, JobStatus.CANCELED) and self.settings.refunds_failed:
            return 0
        return job.charged_micro_usd if job.charged_micro_usd is not None else expected

    # -- outputs, lifecycle

    # -- helpers

    def _poll_url(self, upstream_id: str, status_url: str | None) -> str:
        """statusUrl only when it is on our base_url's origin: anywhere else our
        Bearer key would go with the GET."""
        if status_url and self._urls.same_origin(status_url):
            return status_url
        path = POLL_PATH.format(id=quote(upstream_id, safe=""))
        return self.settings.base_url.rstrip("/") + path


# estimatedTime: "5-15s" in the seed; also read "~5-15s", "10s", "5 - 15 seconds",
# "1-2 min", "5\u201315s" (an en dash). Only the low end matters: no poll before it.
_ESTIMATE = re.compile(
    r"^~?\s*(\d+(?:\.\d+)?)\s*(?:[-\u2013]\s*\d+(?:\.\d+)?)?\s*"
    r"(s|sec|secs|seconds?|m|min|mins|minutes?)?$",
    re.IGNORECASE,
)


def ready_after_s(estimate: object, *, limit_s: float) -> float | None:
    """The low end of VibeDream's estimatedTime, in seconds: how long after the
    submit the job can be done at the earliest. None (poll as the settings say)
    when absent or unreadable, or beyond `limit_s` (the job's deadline: an estimate
    past it is not one to sit out)."""
    if isinstance(estimate, bool):
        return None
    if isinstance(estimate, int | float):
        seconds = float(estimate)  # a bare number: seconds
    elif isinstance(estimate, str) and (m := _ESTIMATE.match(estimate.strip())):
        seconds = float(m.group(1)) * (60.0 if (m.group(2) or "s")[0].lower() == "m" else 1.0)
    else:
        return None
    if not math.isfinite(seconds) or seconds < 0 or seconds > limit_s:
        return None
    return seconds


def _micro_usd(cost_cents: object) -> int | None:
    """costCents (the whole job's price, quoted at submit) as exact micro-USD;
    None when absent or unusable, and the fallback price applies."""
    if isinstance(cost_cents, bool) or not isinstance(cost_cents, int | float | str):
        return None
    try:
        cents = Decimal(str(cost_cents))
    except InvalidOperation:
        return None
    if not cents.is_finite() or cents < 0:
        return None
    return int((cents * MICRO_USD_PER_CENT).to_integral_value(rounding=ROUND_HALF_UP))
