"""The `local` provider: our own FLUX workers (`flux-proxy worker`) on the LAN.

Submits go to the least-loaded healthy worker; polls are short (the worker is
close); cost is GPU-seconds x a configured hourly price. `saturated()` tells the
router when every worker's queue is past `spill_queue_depth`, so traffic spills
over to the paid providers. A worker that stops answering mid-job fails the
attempt after `worker_lost_after_s` (its queue lived in its memory), and the
router fails over.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import Field, field_validator

from common import media
from providers import _http, _pool
from providers.base import (
    BaseProvider,
    Capabilities,
    ErrorKind,
    GenerationRequest,
    JobStatus,
    MalformedResponse,
    ProviderSettings,
    UpstreamJob,
    UpstreamUnavailable,
)

_STATUS = {
    "queued": JobStatus.PROCESSING,
    "running": JobStatus.PROCESSING,
    "completed": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    "canceled": JobStatus.CANCELED,
}
_KINDS = {"invalid_input": ErrorKind.INVALID_INPUT, "policy_refusal": ErrorKind.POLICY}


class LocalSettings(ProviderSettings):
    base_url: str = ""  # unused: see worker_urls
    # LOCAL_WORKER_URLS="http://gpu1:8090,http://gpu2:8090"
    worker_urls: list[str] = Field(default_factory=list)
    gpu_hourly_usd: Decimal = Field(default=Decimal("2.50"), ge=0)  # what one GPU-hour costs you
    spill_queue_depth: int = Field(default=4, ge=0)  # per worker; past it, spill to paid
    health_interval_s: float = Field(default=2.0, gt=0)
    worker_lost_after_s: float = Field(default=5.0, gt=0)
    poll_initial_s: float = Field(default=0.05, gt=0)
    poll_max_s: float = Field(default=0.25, gt=0)
    allow_private_asset_hosts: bool = True  # workers live on private addresses

    @field_validator("worker_urls", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [u.strip().rstrip("/") for u in v.split(",") if u.strip()]
        return [str(u).rstrip("/") for u in v]

    def missing(self, name: str) -> str | None:
        # A worker token is optional; the workers are what is needed.
        return None if self.worker_urls else "no workers (set LOCAL_WORKER_URLS)"


@dataclass(slots=True)
class WorkerState:
    url: str
    healthy: bool = True
    load: int = 0  # queue depth + running, as last seen
    checked: float = 0.0
    unreachable_since: float | None = None


class LocalProvider(BaseProvider):
    settings: LocalSettings

    def __init__(self, name: str, settings: LocalSettings, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 guard: media.OutboundGuard | None = None) -> None:
        self.name = name
        self.settings = settings
        self.capabilities = Capabilities(
            min_side=64, max_side=1536, native_base64=True, native_nsfw_flags=True, cancel=True)
        token = settings.api_key.get_secret_value() if settings.api_key else None
        self._secret = token
        limits = httpx.Limits(max_connections=settings.max_connections,
                              keepalive_expiry=settings.keepalive_expiry_s)
        self._client = _pool.lean_pool(httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=_http.timeout(settings), follow_redirects=False, limits=limits,
            transport=transport), settings)
        self._guard = guard or media.OutboundGuard(
            allow_private=settings.allow_private_asset_hosts)
        hosts = [urlsplit(u).netloc for u in settings.worker_urls]
        self._asset_settings = settings.model_copy(update={"asset_hosts": hosts})
        self.workers = [WorkerState(u) for u in settings.worker_urls]

    # ------------------------------------------------------------------ load

    def saturated(self) -> bool:
        """Every worker busy past the threshold (or down): prefer the others."""
        return all(not w.healthy or w.load > self.settings.spill_queue_depth
                   for w in self.workers)

    async def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        stale = [w for w in self.workers
                 if force or now - w.checked >= self.settings.health_interval_s]
        await asyncio.gather(*(self._check(w) for w in stale))

    async def _check(self, w: WorkerState) -> None:
        w.checked = time.monotonic()
        try:
            r = await self._client.get(f"{w.url}/health", timeout=2.0)
            body = r.json()
            w.load = int(body.get("queue_depth", 0)) + int(body.get("running", 0))
            w.healthy = r.status_code == 200 and body.get("status") == "ok"
        except (httpx.HTTPError, ValueError, TypeError, AttributeError):
            w.healthy = False

    def _worker_of(self, poll_url: str) -> WorkerState:
        for w in self.workers:
            if poll_url.startswith(w.url + "/"):
                return w
        # Never poll a URL that is not one of ours (a key would go with it).
        raise UpstreamUnavailable(f"{self.name}: job is on an unknown worker", provider=self.name,
                                  final=True)

    # ------------------------------------------------------------------ submit

    async def submit(self, req: GenerationRequest) -> UpstreamJob:
        await self._refresh()
        candidates = sorted((w for w in self.workers if w.healthy), key=lambda w: w.load)
        if not candidates:
            await self._refresh(force=True)
            candidates = sorted((w for w in self.workers if w.healthy), key=lambda w: w.load)
        if not candidates:
            raise UpstreamUnavailable(f"{self.name}: no healthy worker", provider=self.name)
        worker = candidates[0]
        body = {
            "prompt": req.prompt, "width": req.width, "height": req.height,
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale, "num_images": req.num_images,
            "seed": req.seed, "output_format": req.output_format,
            "enable_safety_checker": req.enable_safety_checker,
            "output": "base64" if req.enable_base64_output else "url",
        }
        if req.image:
            body |= {"image": req.image, "strength": req.strength}
        if req.mask_image:
            body["mask_image"] = req.mask_image
        try:
            data = await _http.call(self._client, "POST", f"{worker.url}/v1/jobs",
                                    provider=self.name, op="submit", secret=self._secret,
                                    json_body=body, total_s=self.settings.total_timeout_s,
                                    http_timeout=_http.submit_timeout(self.settings),
                                    answer_s=self.settings.submit_timeout_s)
        except UpstreamUnavailable:
            worker.healthy = False  # skip it until the next health check says otherwise
            raise
        job_id = data.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise MalformedResponse(f"{self.name}: submit answer has no job id",
                                    provider=self.name)
        worker.load += 1
        return UpstreamJob(upstream_id=job_id, status=JobStatus.PROCESSING,
                           poll_url=f"{worker.url}/v1/jobs/{job_id}", raw_status="queued")

    # ------------------------------------------------------------------ poll

    async def poll(self, job: UpstreamJob) -> UpstreamJob:
        url = job.poll_url or ""
        worker = self._worker_of(url)
        try:
            data = await _http.call(self._client, "GET", url, provider=self.name, op="poll",
                                    secret=self._secret, total_s=self.settings.total_timeout_s)
        except UpstreamUnavailable as exc:
            now = time.monotonic()
            if exc.status_code == 404:  # the worker restarted: the job went with it
                raise UpstreamUnavailable(f"{self.name}: the worker lost the job",
                                          provider=self.name, final=True) from exc
            worker.unreachable_since = worker.unreachable_since or now
            if now - worker.unreachable_since >= self.settings.worker_lost_after_s:
                worker.healthy = False
                raise UpstreamUnavailable(
                    f"{self.name}: worker unreachable for {self.settings.worker_lost_after_s}s",
                    provider=self.name, final=True) from exc
            raise
        worker.unreachable_since = None
        return self._job(job, data)

    def _job(self, job: UpstreamJob, data: dict[str, Any]) -> UpstreamJob:
        raw = str(data.get("status", ""))
        status = _STATUS.get(raw)
        if status is None:
            raise MalformedResponse(f"{self.name}: unknown job status {raw[:40]!r}",
                                    provider=self.name)
        gpu_s = data.get("gpu_seconds")
        charged = None
        if isinstance(gpu_s, (int, float)) and gpu_s >= 0:
            charged = int(Decimal(str(gpu_s)) * self.settings.gpu_hourly_usd * 1_000_000 / 3600)
        timings = data.get("timings") or {}
        inference = timings.get("inference_ms") if isinstance(timings, dict) else None
        return UpstreamJob(
            upstream_id=job.upstream_id, status=status, poll_url=job.poll_url,
            outputs=[o for o in data.get("outputs") or [] if isinstance(o, str)],
            has_nsfw_contents=data.get("has_nsfw_contents"),
            error=data.get("error"),
            error_kind=_KINDS.get(str(data.get("error_kind")), ErrorKind.UNAVAILABLE)
            if status is JobStatus.FAILED else None,
            charged_micro_usd=charged,
            inference_ms=round(inference) if isinstance(inference, (int, float)) else None,
            raw_status=raw,
            progress=_progress(data.get("progress")),
        )

    async def cancel(self, job: UpstreamJob) -> bool:
        if not job.poll_url:
            return False
        self._worker_of(job.poll_url)
        try:
            r = await self._client.post(f"{job.poll_url}/cancel", timeout=2.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def attempt_cost_micro_usd(self, req: GenerationRequest, job: UpstreamJob | None) -> int:
        """GPU-seconds the worker reports x gpu_hourly_usd; our own GPU costs
        nothing more when the worker never ran the job."""
        if job is None or job.charged_micro_usd is None:
            return 0
        return job.charged_micro_usd

    async def download(self, url: str) -> tuple[bytes, str | None]:
        return await _http.download(self.name, self._client, url, self._asset_settings,
                                    self._guard)

    async def download_to(self, url: str, sink: media.Sink) -> str | None:
        return await _http.download_to(self.name, self._client, url, sink,
                                       self._asset_settings, self._guard)

    async def aclose(self) -> None:
        await self._client.aclose()


def _progress(value: Any) -> tuple[int, int] | None:
    """The worker's {"step": i, "total": n} (steps done of the denoising loop)."""
    if not isinstance(value, dict):
        return None
    step, total = value.get("step"), value.get("total")
    if type(step) is int and type(total) is int and 0 <= step <= total and total > 0:
        return step, total
    return None
