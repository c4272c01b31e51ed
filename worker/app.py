"""The worker's HTTP app: submit, poll, cancel, fetch outputs, health, metrics.

`create_worker_app(settings, engine=..., checker=...)` takes an engine and a
checker for tests; otherwise the lifespan loads both from the settings (and runs
the warm-up) before the first request is served, and refuses to start with a
message that says what to fix. Routes and bodies: see README ("Local worker").
Errors use the proxy's envelope: ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
from litestar import Litestar, MediaType, Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath
from litestar.types import Guard
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST

from common.logging import configure_logging, get_logger, register_secrets
from common.media import MediaError, OutboundGuard

from .images import encode
from .inputs import load_input_image
from .jobs import Job
from .loader import load_checker, load_engine
from .metrics import WorkerMetrics
from .queue import JobQueue, QueueFull
from .runner import BatchRunner, Checker, Engine
from .safety import apply_policy
from .settings import WorkerConfigError, WorkerSettings
from .spec import JobSpec
from .wire import (
    MAX_SEED,
    MIME,
    InvalidRequest,
    JobRequest,
    field_error,
    output_name,
    parse_job_request,
    render_job,
)

log = get_logger("flux_worker.app")

_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 409: "conflict",
          413: "request_too_large", 422: "validation_error", 503: "unavailable"}


class _State:
    """Everything the handlers need, set up by the lifespan."""

    def __init__(self, settings: WorkerSettings, queue: JobQueue, client: httpx.AsyncClient,
                 guard: OutboundGuard) -> None:
        self.settings = settings
        self.queue = queue
        self.client = client
        self.guard = guard


def _error(status: int, message: str, *, details: list[dict[str, Any]] | None = None,
           headers: dict[str, str] | None = None) -> Response[Any]:
    body = {"error": {"code": _CODES.get(status, "error"), "message": message,
                      "details": details}}
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _error(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("http.unhandled", path=request.url.path, error_type=type(exc).__name__)
    return _error(500, "internal error")


def _state(request: Request[Any, Any, Any]) -> _State:
    state: _State = request.app.state.worker
    return state


def _base_url(request: Request[Any, Any, Any], settings: WorkerSettings) -> str:
    return (settings.public_base_url or str(request.base_url)).rstrip("/")


def _token_guard(token: str) -> Guard:
    expected = f"Bearer {token}".encode()

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        given = connection.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise NotAuthorizedException("missing or wrong bearer token",
                                         headers={"WWW-Authenticate": "Bearer"})

    return guard


# --------------------------------------------------------------------------- jobs


async def _load_inputs(st: _State, req: JobRequest
                       ) -> tuple[Image.Image | None, Image.Image | None]:
    """Fetch and decode the input images (422 naming the field on any problem)."""
    if req.image is None:
        return None, None

    async def load(value: str, field: str) -> Image.Image:
        return await load_input_image(value, field=field, client=st.client, guard=st.guard,
                                      max_bytes=st.settings.max_input_bytes,
                                      timeout_s=st.settings.fetch_timeout_s,
                                      as_mask=field == "mask_image")

    image = await load(req.image, "image")
    mask = await load(req.mask_image, "mask_image") if req.mask_image is not None else None
    return image, mask


def _spec(req: JobRequest, image: Image.Image | None, mask: Image.Image | None) -> JobSpec:
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
    return JobSpec(prompt=req.prompt, mode=req.mode, width=req.width, height=req.height,
                   steps=req.steps, guidance=req.guidance, num_images=req.num_images,
                   seed=seed, output_format=req.output_format, strength=req.strength,
                   image=image, mask=mask)


def _busy(queue: JobQueue) -> Response[Any]:
    retry = queue.retry_after_s()
    return _error(503, f"the queue is full ({queue.max_queue} jobs); retry in {retry}s",
                  headers={"Retry-After": str(retry)})


@post("/jobs", status_code=202)
async def submit_job(request: Request[Any, Any, Any]) -> Response[Any]:
    st = _state(request)
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return _error(400, "the body is not valid JSON")
    try:
        req = parse_job_request(body)
    except InvalidRequest as exc:
        return _error(422, "invalid job request", details=exc.errors)
    if st.queue.depth >= st.queue.max_queue:  # before fetching anything
        st.queue.metrics.jobs_rejected.labels("queue_full").inc()
        return _busy(st.queue)
    try:
        image, mask = await _load_inputs(st, req)
    except MediaError as exc:
        field = exc.field or "image"
        log.info("job.input_refused", field=field, reason=exc.reason, detail=exc.detail)
        value = body.get(field) if isinstance(body.get(field), str) else None
        return _error(422, "invalid input image",
                      details=[field_error(field, exc.reason, value)])
    spec = _spec(req, image, mask)
    try:
        spec.check()  # the engine's own rules; parse_job_request already enforces them
    except ValueError as exc:
        return _error(422, "invalid job request", details=[field_error("body", str(exc))])
    try:
        job = st.queue.submit(spec, safety=req.safety, output=req.output)
    except QueueFull:
        return _busy(st.queue)
    base = _base_url(request, st.settings)
    return Response({"id": job.id, "status": job.status,
                     "queue_position": st.queue.position(job),
                     "urls": {"get": f"{base}/v1/jobs/{job.id}",
                              "cancel": f"{base}/v1/jobs/{job.id}/cancel"}},
                    status_code=202, media_type=MediaType.JSON)


def _job_or_404(st: _State, job_id: str) -> Job:
    job = st.queue.get(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r} (unknown or expired)")
    return job


def _view(request: Request[Any, Any, Any], st: _State, job: Job) -> dict[str, Any]:
    return render_job(job, base_url=_base_url(request, st.settings), output=job.output,
                      position=st.queue.position(job))


@get("/jobs/{job_id:str}")
async def get_job(request: Request[Any, Any, Any], job_id: FromPath[str]) -> dict[str, Any]:
    st = _state(request)
    return _view(request, st, _job_or_404(st, job_id))


@post("/jobs/{job_id:str}/cancel", status_code=200)
async def cancel_job(request: Request[Any, Any, Any], job_id: FromPath[str]) -> Response[Any]:
    """200 with the job once it is canceled (again: idempotent); 409 when it had
    already completed or failed."""
    st = _state(request)
    job = st.queue.cancel(_job_or_404(st, job_id).id) or _job_or_404(st, job_id)
    if job.status != "canceled":
        return _error(409, f"job {job_id!r} already {job.status}")
    return Response(_view(request, st, job), media_type=MediaType.JSON)


@get("/jobs/{job_id:str}/outputs/{name:str}")
async def get_output(request: Request[Any, Any, Any], job_id: FromPath[str],
                     name: FromPath[str]) -> Response[bytes]:
    st = _state(request)
    job = _job_or_404(st, job_id)
    for index in range(len(job.outputs)):
        if output_name(job, index) == name:
            return Response(job.outputs[index], media_type=MIME[job.output_format],
                            headers={"Cache-Control": "private, max-age=3600"})
    raise HTTPException(status_code=404, detail=f"job {job_id!r} has no output {name!r}")


# --------------------------------------------------------------------------- system


@get("/health")
async def health(request: Request[Any, Any, Any]) -> Response[Any]:
    st = _state(request)
    engine = st.queue.runner.engine
    body = {"status": "ok", "queue_depth": st.queue.depth, "running": st.queue.running,
            "max_batch_size": st.queue.max_batch_size, "max_queue": st.queue.max_queue,
            "device": engine.device_info()}
    return Response(body, media_type=MediaType.JSON)


@get("/metrics", media_type=CONTENT_TYPE_LATEST)
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    return _state(request).queue.metrics.render()


# --------------------------------------------------------------------------- factory


async def _load(settings: WorkerSettings, engine: Engine | None, checker: Checker | None
                ) -> tuple[Engine, Checker | None]:
    """The injected engine/checker, or both loaded from the settings (blocking: a thread)."""
    if engine is None:
        settings.check(need_model=True, need_checker=checker is None)
        engine = cast(Engine, await asyncio.to_thread(load_engine, settings))
    if checker is None and settings.safety_checker != "none":
        settings.check(need_model=False, need_checker=True)
        checker = await asyncio.to_thread(load_checker, settings)
    return engine, checker


def create_worker_app(
    settings: WorkerSettings | None = None,
    *,
    engine: Engine | None = None,
    checker: Checker | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Litestar:
    """The worker app. ``engine``/``checker`` injected: used as they are (tests);
    otherwise loaded from ``settings`` at start-up. ``transport``: for input fetches."""
    settings = settings or WorkerSettings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.token is not None:
        register_secrets([settings.token.get_secret_value()])

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        try:
            eng, chk = await _load(settings, engine, checker)
        except WorkerConfigError as exc:
            log.error("worker.start_failed", reason=str(exc))
            raise
        runner = BatchRunner(eng, encode=encode, checker=chk, apply_policy=apply_policy,
                             nsfw_policy=settings.nsfw_policy)
        queue = JobQueue(runner, max_batch_size=settings.max_batch_size,
                         batch_window_s=settings.batch_window_s, max_queue=settings.max_queue,
                         job_ttl_s=settings.job_ttl_s, max_finished=settings.max_finished_jobs,
                         metrics=WorkerMetrics())
        guard = OutboundGuard(allow_private=settings.allow_private_urls)
        async with httpx.AsyncClient(transport=transport, trust_env=False,
                                     follow_redirects=False) as client:
            app.state.worker = _State(settings, queue, client, guard)
            await queue.start()
            log.info("worker.started", device=eng.device_info(), safety=settings.safety_checker
                     if chk is not None else "none", max_batch_size=settings.max_batch_size,
                     auth=settings.token is not None)
            try:
                yield
            finally:
                await queue.stop()
                log.info("worker.stopped")

    guards = [_token_guard(settings.token.get_secret_value())] if settings.token else []
    v1 = Router(path="/v1", route_handlers=[submit_job, get_job, cancel_job, get_output],
                guards=guards)
    return Litestar(
        route_handlers=[v1, health, metrics],
        lifespan=[lifespan],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        debug=False,
        logging_config=None,
    )
