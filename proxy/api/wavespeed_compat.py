"""WaveSpeed's wire format under /api/v3 (``Client(api_key=<proxy key>, base_url=<proxy>)``
of the official ``wavespeed`` SDK, or WaveSpeed's curl examples): a thin translator onto
the one schema and `admit`, like every surface.

* ``POST /api/v3/wavespeed-ai/<model>`` (the SDK posts to ``{base_url}/api/v3/{model}``):
  ``wavespeed-ai/flux-dev`` is the proxy's model ``flux-dev`` (any model in
  ``settings.models`` the same way); the body is the seed's parameters, validated by the
  unified schema. The answer is WaveSpeed's ``{code, message, data}``, ``data`` the
  prediction (its id is the proxy's prediction id, the one ``GET /v1/predictions/{id}``
  shows to the same key). ``enable_sync_mode`` waits (``sync_timeout_s``) and answers the
  terminal prediction, or, still running, what WaveSpeed answers when its sync wait gives
  up: status ``processing``, ``data.code`` 5004, "Sync mode timed out" (the SDK's test).
* ``GET /api/v3/predictions/{id}/result`` and ``GET /api/v3/predictions/{id}``: the same
  ``data``. Statuses are the seed's four: queued -> created, canceled -> failed (its error
  says so). A failed prediction carries WaveSpeed's ``data.code`` for why (1200 content
  moderation, 1400 bad input, 5000 anything else) as the simulator and our adapter read it.
* Outputs are URLs, or with ``enable_base64_output`` plain base64 strings (no ``data:``
  prefix), as WaveSpeed returns them.

Errors are WaveSpeed's envelope with the HTTP status as its code (proxy/api/wavespeed_media.py);
media uploads are there too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import HttpMethod, Request, Response, Router, get, post, route
from litestar.params import FromPath
from pydantic import ValidationError

from proxy.accounts.auth import principal_of, require_key
from proxy.api.deps import Api, ApiDep
from proxy.api.render import base_url, output_urls
from proxy.api.submitting import (
    Refusal,
    admit,
    check_names,
    finish_sync,
    from_validation_error,
    prediction_headers,
)
from proxy.api.wavespeed_media import EXCEPTION_HANDLERS, MEDIA_HANDLERS, envelope, ws_error
from proxy.lifecycle.run import Run
from proxy.lifecycle.service import NotFound
from proxy.schema import FieldError, GenerateRequest
from proxy.store.models import Attempt, Prediction

OWNER = "wavespeed-ai"  # WaveSpeed's model ids: "wavespeed-ai/flux-dev"
# The body's parameters: the seed's, plus the proxy's own `providers` (pin or exclude).
PARAMS = frozenset(GenerateRequest.model_fields) - {"model"}
STATUS = {"queued": "created", "processing": "processing", "completed": "completed",
          "failed": "failed", "canceled": "failed"}
# data.code of a failed task, as WaveSpeed (and so the simulator and providers/wavespeed.py)
# use it: the proxy's error kind -> WaveSpeed's code. Anything else: 5000 (internal).
FAILURE_CODES = {"policy_refusal": 1200, "invalid_input": 1400}
CODE_SYNC_TIMEOUT = 5004
SYNC_TIMEOUT_ERROR = (
    "Sync mode timed out; the task is still processing. Query the result URL later.")


def model_of(path: str, models: list[str]) -> str | None:
    """``wavespeed-ai/flux-dev`` -> ``flux-dev`` when the proxy serves it."""
    owner, _, name = path.strip("/").partition("/")
    return name if owner == OWNER and name in models else None


def _describe(err: FieldError) -> str:
    text = f"{err.field}: {err.reason}"
    if err.value is not None and not isinstance(err.value, (dict, list)):
        text += f" (got {err.value!r})"
    if err.allowed:
        text += f"; allowed: {err.allowed}"
    return text


def refusal_error(refusal: Refusal) -> Response[Any]:
    """A refusal of parsing or `admit` in WaveSpeed's shape; a bad parameter is a 400
    whose message names it."""
    kind = refusal.kind
    headers = dict(refusal.headers) or None
    if kind == "invalid":
        message = ("Invalid parameter " + "; ".join(_describe(d) for d in refusal.details)
                   if refusal.details else refusal.message)
        return ws_error(400, message)
    if kind == "invalid_json":
        return ws_error(400, f"Invalid request body: {refusal.message}")
    if kind == "unsupported":  # no enabled provider can make this request
        return ws_error(400, f"Unsupported request: {refusal.message}")
    if kind == "rate_limited":
        return ws_error(429, f"Too many requests: {refusal.message}", headers=headers)
    if kind == "budget":
        return ws_error(402, f"Insufficient balance: {refusal.message}", headers=headers)
    if kind == "conflict":
        return ws_error(409, refusal.message, headers=headers)
    return ws_error(503, f"Service temporarily unavailable: {refusal.message}",
                    headers=headers)  # unavailable, no_provider


def to_request(body: Any, model: str, api: Api, query: dict[str, str]
               ) -> GenerateRequest | Response[Any]:
    """The seed's body as the unified request, or the 400 naming what is wrong."""
    for name in query:
        if name == "webhook":
            return ws_error(400, "Invalid parameter webhook: webhooks are not supported by "
                            "flux-proxy; poll data.urls.get or set enable_sync_mode")
        return ws_error(400, f"Invalid parameter {name}: unknown query parameter")
    if not isinstance(body, dict):
        return ws_error(400, "Invalid request body: a JSON object is expected")
    unknown = [k for k in body if k not in PARAMS]
    if unknown:
        return ws_error(400, f"Invalid parameter {unknown[0]}: not a parameter of "
                        f"{OWNER}/{model} (accepted: {', '.join(sorted(PARAMS))})")
    try:
        req = GenerateRequest.model_validate({**body, "model": model})
    except ValidationError as exc:
        return refusal_error(from_validation_error(exc))
    refused = check_names(req, api.settings.models, list(api.provider_settings))
    return refusal_error(refused) if refused else req


def _iso(when: datetime) -> str:
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _plain(output: str) -> str:
    """WaveSpeed's base64 outputs are bare: a data URI's payload."""
    return output.partition(",")[2] if output.startswith("data:") else output


def prediction_data(pred: Prediction, base: str, *, sync_timed_out: bool = False
                    ) -> dict[str, Any]:
    """A prediction as WaveSpeed's ``data`` object."""
    status = STATUS.get(pred.status, "processing")
    data: dict[str, Any] = {
        "id": pred.id,
        "model": f"{OWNER}/{pred.model}",
        "outputs": [],
        "urls": {"get": f"{base.rstrip('/')}/api/v3/predictions/{pred.id}/result"},
        "has_nsfw_contents": [],
        "status": status,
        "created_at": _iso(pred.created_at),
        "error": "",
        "timings": {"inference": 0},
    }
    if pred.status == "completed":
        data["outputs"] = [_plain(o) for o in output_urls(pred.outputs, base)]
        data["has_nsfw_contents"] = list(pred.has_nsfw_contents or [])
        timings = pred.timings or {}
        # What the upstream measured; else the winning attempt's latency (an upper bound).
        ms = timings.get("inference_ms") or timings.get("upstream_ms") or 0
        data["timings"] = {"inference": int(ms)}
    elif pred.status == "canceled":
        data["error"] = f"Task canceled: {pred.error or 'canceled by client'}"
    elif pred.status == "failed":
        data["error"] = pred.error or "Task failed."
        data["code"] = FAILURE_CODES.get(pred.error_kind or "", 5000)
    elif sync_timed_out:
        data.update(status="processing", error=SYNC_TIMEOUT_ERROR, code=CODE_SYNC_TIMEOUT)
    return data


@post("/{model_path:path}", guards=[require_key], status_code=200,
      summary="WaveSpeed: submit a task (POST /api/v3/wavespeed-ai/flux-dev)")
async def submit(request: Request[Any, Any, Any], model_path: FromPath[str], api: ApiDep
                 ) -> Response[Any]:
    model = model_of(model_path, api.settings.models)
    if model is None:
        served = ", ".join(f"{OWNER}/{m}" for m in api.settings.models)
        return ws_error(404, f"Model {model_path.strip('/')!r} not found: flux-proxy serves "
                        f"{served}")
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        return ws_error(400, f"Invalid request body: not JSON ({exc})")
    req = to_request(body, model, api, dict(request.query_params))
    if isinstance(req, Response):
        return req
    run = await admit(request, api, req, surface="wavespeed")
    if isinstance(run, Refusal):
        return refusal_error(run)
    timed_out = req.enable_sync_mode and not await finish_sync(api, run)
    data = prediction_data(run.pred, base_url(request, api.settings), sync_timed_out=timed_out)
    return envelope(data, headers=prediction_headers(run))


async def _answer(request: Request[Any, Any, Any], api: Api, prediction_id: str
                  ) -> Response[Any]:
    try:
        pred, attempts = await api.service.get(prediction_id, principal_of(request))
    except NotFound:
        return ws_error(404, f"Prediction {prediction_id} not found")
    data = prediction_data(pred, base_url(request, api.settings))
    return envelope(data, headers=_headers(pred, attempts))


def _headers(pred: Prediction, attempts: list[Attempt]) -> dict[str, str]:
    return prediction_headers(Run(pred=pred, attempts=attempts))


@get("/predictions/{prediction_id:str}/result", guards=[require_key],
     summary="WaveSpeed: a task's result")
async def get_result(request: Request[Any, Any, Any], prediction_id: FromPath[str], api: ApiDep
                     ) -> Response[Any]:
    return await _answer(request, api, prediction_id)


@get("/predictions/{prediction_id:str}", guards=[require_key],
     summary="WaveSpeed: a task")
async def get_prediction(request: Request[Any, Any, Any], prediction_id: FromPath[str], api: ApiDep
                         ) -> Response[Any]:
    return await _answer(request, api, prediction_id)


# Litestar answers a wrong method before any route's layer applies, in the native
# shape; these keep WaveSpeed's on /api/v3.
_ALL = (HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH, HttpMethod.DELETE)
_METHODS: dict[HttpMethod, list[str]] = {
    HttpMethod.GET: ["/predictions/{prediction_id:str}/result",
                     "/predictions/{prediction_id:str}", "/media/files/{name:str}"],
    HttpMethod.POST: ["/media/uploads", "/media/upload/binary"],
    HttpMethod.PUT: ["/media/uploads/{upload_id:str}"],
}


def _wrong_method(allowed: HttpMethod) -> Any:
    async def wrong_method(request: Request[Any, Any, Any]) -> Response[Any]:
        return ws_error(405, f"Method {request.method} not allowed on {request.url.path}: "
                        f"use {allowed.value}", headers={"Allow": allowed.value})

    return route(_METHODS[allowed], http_method=[m for m in _ALL if m != allowed],
                 status_code=405, include_in_schema=False,
                 name=f"wavespeed-wrong-method-{allowed.value.lower()}")(wrong_method)


@route("/{model_path:path}", http_method=[m for m in _ALL if m != HttpMethod.POST],
       status_code=404, include_in_schema=False)
async def unknown_route(request: Request[Any, Any, Any]) -> Response[Any]:
    return ws_error(404, f"Not found: {request.method} {request.url.path}")


# One layer for every WaveSpeed route: errors (the key guard's 401 too) in its shape.
WAVESPEED_ROUTER = Router(
    path="/api/v3",
    route_handlers=[get_result, get_prediction, *MEDIA_HANDLERS, submit, unknown_route,
                    *(_wrong_method(m) for m in _METHODS)],
    exception_handlers=EXCEPTION_HANDLERS,
    tags=["wavespeed"],
)

HANDLERS: list[Any] = [WAVESPEED_ROUTER]
