"""WaveSpeed FLUX.1 [dev] (seed: wavespeed-flux-dev.txt).

    POST {base}/api/v3/wavespeed-ai/flux-dev          -> {code, message, data}
    GET  {base}/api/v3/predictions/{id}/result        -> {code, message, data}

Native base64 outputs and per-image NSFW flags. No cancel endpoint in the seed.
WaveSpeed also has a sync mode (`enable_sync_mode`: the POST is held until the
task ends, up to ~90 s); by default the adapter does not use it: it submits
asynchronously (the answer comes at once, so a hung upstream shows within
submit_timeout_s) and the proxy polls, which is how it emulates sync mode for a
client that asked for it. `use_native_sync = true` sends the client's sync flag
upstream instead (one round trip, no polls; but a hung WaveSpeed then costs up to
sync_read_timeout_s before failover, and a submit lost while held is a task we
paid for and never saw).
"""

from __future__ import annotations

import math
from dataclasses import replace
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

SUBMIT_PATH = "/api/v3/wavespeed-ai/flux-dev"
RESULT_PATH = "/api/v3/predictions/{id}/result"

CAPABILITIES = Capabilities(
    sizes=None,  # seed: 256 ~ 1536 per dimension
    min_side=256,
    max_side=1536,
    max_num_images=4,
    img2img=True,
    inpainting=True,
    native_sync=True,
    native_base64=True,
    native_nsfw_flags=True,
    requires_public_image_urls=False,
    cancel=False,
)


class WaveSpeedSettings(ProviderSettings):
    base_url: str = "https://api.wavespeed.ai"
    # Outputs are served from WaveSpeed hosts and a CloudFront distribution.
    asset_hosts: list[str] = Field(
        default_factory=lambda: ["*.wavespeed.ai", "d1q70pf5vjeyhc.cloudfront.net"]
    )
    # List price of FLUX.1 [dev] on WaveSpeed, $0.012 per image, as of 2026-11.
    price_micro_usd_per_image: int = Field(default=12_000, ge=0)
    refunds_failed: bool = True  # WaveSpeed does not bill failed tasks
    # Send a client's enable_sync_mode upstream (see the module docstring); off:
    # submit asynchronously and poll, whatever the client asked.
    use_native_sync: bool = False
    # With use_native_sync: sync-mode POSTs are held up to ~90 s upstream before
    # it gives up (code 5004); this bounds the wait for such an answer.
    sync_read_timeout_s: float = Field(default=100.0, gt=0)


# --------------------------------------------------------------------------- wire shapes


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: int
    message: str | None = None
    data: dict[str, Any] | None = None


class _Urls(BaseModel):
    model_config = ConfigDict(extra="ignore")

    get: str | None = None


class _Timings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inference: float | None = None


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)
    status: str
    outputs: list[str] | None = None
    urls: _Urls | None = None
    has_nsfw_contents: list[bool] | None = None
    error: str | None = None
    # Not in the seed's table, but WaveSpeed sends it: why a task failed (or,
    # 5004, why a sync-mode POST stopped waiting).
    code: int | None = None
    timings: _Timings | None = None


_STATUS = {
    "created": JobStatus.PROCESSING,
    "processing": JobStatus.PROCESSING,
    "completed": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    # Not in the seed's table; states WaveSpeed tasks are known to end in.
    "cancelled": JobStatus.CANCELED,
    "canceled": JobStatus.CANCELED,
    "timeout": JobStatus.FAILED,
    "deleted": JobStatus.FAILED,
}

# data.code of a failed task -> why. Unknown codes are taken as upstream faults.
_FAILURE_KIND = {
    1200: ErrorKind.POLICY,  # content moderation
    1400: ErrorKind.INVALID_INPUT,
    1401: ErrorKind.INVALID_INPUT,
    # Media access failed: WaveSpeed could not fetch the client's input image.
    # The URL is the client's; another provider would fetch the same URL from
    # the same internet, so failing over mostly spends money on the same error.
    1402: ErrorKind.INVALID_INPUT,
    5000: ErrorKind.UNAVAILABLE,
    5003: ErrorKind.UNAVAILABLE,
}


# --------------------------------------------------------------------------- provider


class WaveSpeedProvider(_http.HTTPProvider):
    capabilities = CAPABILITIES

    def __init__(
        self,
        name: str,
        settings: WaveSpeedSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        guard: media.OutboundGuard | None = None,
    ) -> None:
        super().__init__(name, settings, transport=transport, guard=guard)
        self.settings: WaveSpeedSettings = settings
        # WaveSpeed has a sync mode; whether this provider uses it is a setting.
        self.capabilities = replace(CAPABILITIES, native_sync=settings.use_native_sync)

    # -- map request

    def _sync(self, req: GenerationRequest) -> bool:
        return req.enable_sync_mode and self.settings.use_native_sync

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
            seed=req.seed,
            guidance_scale=req.guidance_scale,
            num_images=req.num_images,
            output_format=req.output_format,
            # The seed: base64 "instead of a URL", whatever the mode; WaveSpeed's
            # docs say the polled result carries it too (only webhooks refuse it),
            # so an asynchronous submit keeps native base64. Should a result come
            # back as URLs anyway, the proxy downloads and encodes them.
            enable_base64_output=req.enable_base64_output,
            enable_safety_checker=req.enable_safety_checker,
            enable_sync_mode=self._sync(req),
        )
        return body

    # -- call

    async def submit(self, req: GenerationRequest) -> UpstreamJob:
        """One POST, never retried. An asynchronous submit answers at once
        ("created"); no answer within submit_timeout_s is a hung upstream, and
        the outcome unknown. In native sync mode the answer is usually terminal;
        when WaveSpeed stops holding the POST (data.code 5004) the job comes back
        processing and the caller polls it -- never POST again."""
        s = self.settings
        timeout, answer, total = _http.submit_timeout(s), s.submit_timeout_s, s.total_timeout_s
        if self._sync(req):
            answer = s.sync_read_timeout_s
            timeout = _http.timeout(s, read_s=answer)
            total += answer  # the POST is held while it runs
        body = await _http.call(
            self._client,
            "POST",
            SUBMIT_PATH,
            provider=self.name,
            op="submit",
            secret=self._secret,
            urls=self._urls,
            json_body=self._body(req),
            http_timeout=timeout,
            answer_s=answer,
            total_s=total,
        )
        return self._job(self._data(body, "submit"), expected_format=req.output_format)

    async def poll(self, job: UpstreamJob) -> UpstreamJob:
        body = await _http.call(
            self._client,
            "GET",
            self._poll_url(job.upstream_id, job.poll_url),
            provider=self.name,
            op="poll",
            secret=self._secret,
            urls=self._urls,
            total_s=self.settings.total_timeout_s,
        )
        data = self._data(body, "poll")
        if data.id != job.upstream_id:  # never hand one task's images to another
            raise MalformedResponse(f"{self.name}: poll answered another task", provider=self.name)
        return self._job(data, expected_format=None)

    async def cancel(self, job: UpstreamJob) -> bool:
        return False  # no cancel endpoint in the seed

    # -- map response

    def _data(self, body: dict[str, Any], op: _http.Call) -> _Data:
        env = _http.parse_model(self.name, op, _Envelope, body)
        if env.code != 200:  # the envelope's code is used like an HTTP status
            _http.raise_for_status(
                self.name, op, env.code, _http.safe_text(env.message, self._secret)
            )
        if env.data is None:
            raise MalformedResponse(f"{self.name}: {op} answer has no data", provider=self.name)
        return _http.parse_model(self.name, op, _Data, env.data)

    def _job(self, data: _Data, *, expected_format: str | None) -> UpstreamJob:
        status = _STATUS.get(data.status.lower())
        if status is None:
            raise MalformedResponse(
                f"{self.name}: unknown task status {_http.safe_text(data.status)!r}",
                provider=self.name,
            )
        job = UpstreamJob(
            upstream_id=data.id,
            status=status,
            poll_url=self._poll_url(data.id, data.urls.get if data.urls else None),
            upstream_code=data.code,
            raw_status=data.status,
        )
        # No ready_after_s: the seed's only timing, timings.inference, measures a
        # task that ran; it is no estimate of one still to run. Polls follow the
        # poll settings.
        inference = data.timings.inference if data.timings else None
        if inference is not None and math.isfinite(inference):
            job.inference_ms = round(inference)
        if status is JobStatus.COMPLETED:
            if not data.outputs:
                raise MalformedResponse(
                    f"{self.name}: task completed without outputs", provider=self.name
                )
            job.outputs = [self._output(o, expected_format) for o in data.outputs]
            flags = data.has_nsfw_contents
            # One flag per image, or the upstream did not really say.
            job.has_nsfw_contents = (
                list(flags) if flags and len(flags) == len(job.outputs) else None
            )
        elif status is JobStatus.FAILED:
            job.error = _http.safe_text(data.error, self._secret) or f"task {data.status}"
            job.error_kind = self._failure_kind(data)
        elif status is JobStatus.CANCELED:
            job.error = _http.safe_text(data.error, self._secret) or "task cancelled"
        return job

    def _failure_kind(self, data: _Data) -> ErrorKind:
        status = data.status.lower()
        if status == "timeout":
            return ErrorKind.TIMEOUT
        if status == "deleted":
            return ErrorKind.UNAVAILABLE
        if data.code in _FAILURE_KIND:
            return _FAILURE_KIND[data.code]
        if _http.looks_like_policy_refusal(data.error):
            return ErrorKind.POLICY
        return ErrorKind.UNAVAILABLE

    def _output(self, value: str, expected_format: str | None) -> str:
        """URLs as they are; bare base64 (enable_base64_output) as a data URI."""
        if value.startswith(("https://", "http://", "data:")):
            return value
        try:
            return media.b64_to_data_uri(value, expected=expected_format)
        except media.MediaError as exc:
            raise MalformedResponse(
                f"{self.name}: base64 output is not an image ({_http.safe_text(str(exc))})",
                provider=self.name,
            ) from exc

    # -- cost

    def attempt_cost_micro_usd(self, req: GenerationRequest, job: UpstreamJob | None) -> int:
        """List price x images. Failed tasks are refunded (refunds_failed). With
        no answer to the submit (job None, outcome unknown) the task may exist
        and be billed: charge the expected price rather than nothing."""
        price = self.settings.price_micro_usd_per_image
        if job is None:
            return price * req.num_images
        if job.status in (JobStatus.FAILED, JobStatus.CANCELED) and self.settings.refunds_failed:
            return 0
        if job.status is JobStatus.COMPLETED and job.outputs:
            return price * len(job.outputs)
        return price * req.num_images

    # -- outputs, lifecycle

    # -- helpers

    def _poll_url(self, upstream_id: str, get_url: str | None) -> str:
        """data.urls.get only on our base_url's origin: anywhere else our Bearer
        key would go with the GET."""
        if get_url and self._urls.same_origin(get_url):
            return get_url
        path = RESULT_PATH.format(id=quote(upstream_id, safe=""))
        return self.settings.base_url.rstrip("/") + path
