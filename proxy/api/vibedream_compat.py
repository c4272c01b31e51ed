"""VibeDream's wire format (seed: vibedream-flux-dev.txt) onto the one service.

    POST /api/v1/models/{model}/generate  -> 200 {id, status: "processing", statusUrl,
                                                 estimatedTime, costCents, createdAt}
    GET  /api/v1/predictions/{id}         -> 200 {id, modelId, modelName, status, outputs,
                                                 error, createdAt, completedAt, costCents}

An app switches by changing its base URL and key: the body is translated onto
`GenerateRequest`, admitted by `submitting.admit` (same routing, budget, ledger and
metrics as POST /v1/predictions, surface "vibedream"), and the poll reads the same
prediction GET /v1/predictions/{id} shows. Errors are VibeDream's `{"error": "<message>"}`
(the shape our simulator and adapter speak), every one of them: the guard's 401, 413,
404, 405 included (exception handlers on this Router).

Choices where the seed is silent, and why:
- `image` / `mask_image`: public http(s) URLs as the seed says, and also
  `data:image/...;base64` URIs (the proxy's own schema takes both; a request that
  only a data-URI-capable provider can serve is routed there);
- sizes: the unified schema's range (any W*H, 256..1536 a side), a superset of
  VibeDream's seven; the 0.1 / 0.5 steps of strength / guidance are not enforced
  (VibeDream's own table shows them as UI steps);
- a field the seed does not list is refused (400 naming it) rather than ignored, like
  every other bad input of this proxy; null means "absent", as in VibeDream;
- invalid input is 400 (VibeDream's status for it); a valid request that no enabled
  provider can serve is 422; budget 402; rate limit 429 and unavailable 503, both
  with Retry-After;
- costCents: the proxy's ledger in whole cents, rounded UP (never less than was
  spent); at submit, before anything is billed, the expected cost of the provider
  taking it (the price the budget hold is made from);
- estimatedTime: the 10th-90th percentile of that provider's recent attempt
  latencies as "low-high s"; until 5 are seen, the seed's listed "5-15s".
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, Router, get, post, route
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation
from litestar.params import FromPath
from pydantic import ValidationError

from common.logging import get_logger
from proxy.accounts.auth import principal_of, require_key
from proxy.api.deps import Api, ApiDep
from proxy.api.render import base_url, output_urls
from proxy.api.submitting import (
    Refusal,
    admit,
    check_names,
    from_validation_error,
    invalid,
    prediction_headers,
)
from proxy.lifecycle.run import Run
from proxy.lifecycle.service import NotFound
from proxy.schema import FieldError, GenerateRequest
from proxy.store.models import Attempt, Prediction

log = get_logger("flux_proxy.api.vibedream")

PREFIX = "/api/v1"
MODEL_NAMES = {"flux-dev": "FLUX.1 Dev"}  # VibeDream's human-readable names
# The seed's one documented failure text, verbatim.
MODERATION_ERROR = "Your request was flagged by content moderation. Please modify your prompt."
CANCELED_ERROR = "The prediction was canceled."
GENERIC_ERROR = "Generation failed due to an internal error. Please try again."
# The seed's listing ("Image output ~5-15s"): said until a provider's latencies are known.
DEFAULT_ESTIMATE = "5-15s"
ESTIMATE_MIN_SAMPLES = 5
MICRO_USD_PER_CENT = 10_000

# The seed's input table; anything else is refused by name.
FIELDS = ("prompt", "image", "mask_image", "strength", "size", "num_inference_steps",
          "guidance_scale", "num_images", "seed", "output_format")
_INT_FIELDS = ("num_inference_steps", "num_images", "seed")  # "number" in the seed

_STATUS = {"queued": "processing", "processing": "processing", "completed": "completed",
           "failed": "failed", "canceled": "failed"}
# Refusal kinds whose VibeDream status differs from the native one.
_REFUSAL_STATUS = {"invalid": 400, "invalid_json": 400}


# --------------------------------------------------------------------------- wire shapes


class VibeDreamError(msgspec.Struct):
    error: str


class VibeDreamSubmitted(msgspec.Struct, rename="camel"):
    id: str
    status: str
    status_url: str
    estimated_time: str
    cost_cents: int
    created_at: str | None


class VibeDreamPrediction(msgspec.Struct, rename="camel"):
    id: str
    model_id: str
    model_name: str
    status: str
    outputs: list[str] | None
    error: str | None
    created_at: str | None
    completed_at: str | None
    cost_cents: int


# --------------------------------------------------------------------------- errors


def vd_error(status: int, message: str, headers: dict[str, str] | None = None
             ) -> Response[VibeDreamError]:
    return Response(VibeDreamError(message), status_code=status, media_type=MediaType.JSON,
                    headers=headers)


def _field_message(details: list[FieldError]) -> str:
    """Every bad field in one sentence: VibeDream's error is a single string."""
    parts = []
    for d in details:
        text = f"{d.field}: {d.reason}"
        extra = [f"got {json.dumps(d.value, default=str)}"] if d.value is not None else []
        if d.allowed:
            extra.append(f"allowed: {d.allowed}")
        parts.append(f"{text} ({'; '.join(extra)})" if extra else text)
    return "; ".join(parts)


def refusal_error(refusal: Refusal) -> Response[Any]:
    status = _REFUSAL_STATUS.get(refusal.kind, refusal.status)
    message = _field_message(refusal.details) if refusal.kind == "invalid" else refusal.message
    return vd_error(status, message or refusal.message, refusal.headers or None)


def _http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    # The guard's 401, 413 (body too large), a bad path parameter: VibeDream's shape.
    return vd_error(exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("http.unhandled", path=request.url.path, error_type=type(exc).__name__)
    return vd_error(500, "Internal server error")


# --------------------------------------------------------------------------- request


def parse_body(raw: bytes, model: str) -> GenerateRequest | Refusal:
    """A VibeDream submit body as the one schema, or why not."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return Refusal("invalid_json", 400, f"Request body is not valid JSON: {exc}",
                       "invalid_json")
    if not isinstance(body, dict):
        return invalid("request body must be a JSON object",
                       [FieldError(field="body", reason="not a JSON object")])
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        return invalid("request validation failed", [
            FieldError(field=k, reason="unknown field", allowed=f"one of {', '.join(FIELDS)}")
            for k in unknown])
    fields: dict[str, Any] = {"model": model}
    for name, value in body.items():
        if value is None:  # VibeDream: null is the default
            continue
        if name in _INT_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)  # "number" in the seed: 28.0 is 28
        fields[name] = value
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        return from_validation_error(exc)


# --------------------------------------------------------------------------- response


def iso(ts: datetime | None) -> str | None:
    """The seed's timestamps: "2025-01-15T12:00:00.000Z" (UTC, milliseconds)."""
    if ts is None:
        return None
    ts = ts.astimezone(UTC) if ts.tzinfo else ts  # naive ones are UTC (SQLite)
    return f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z"


def cents(micro_usd: int) -> int:
    """Whole cents, rounded up: never less than the ledger says was spent."""
    return -(-micro_usd // MICRO_USD_PER_CENT)


def _ledger(pred: Prediction, attempts: list[Attempt]) -> int:
    # As prediction_headers / the native view count it: the total once terminal,
    # else what the attempts recorded so far.
    return pred.cost_micro_usd or sum(a.cost_micro_usd for a in attempts)


def _provider_of(run: Run) -> str | None:
    if run.admitted is not None:
        return run.admitted.name
    return run.attempts[-1].provider if run.attempts else None


def quoted_micro_usd(api: Api, run: Run, req: GenerateRequest) -> int:
    """What the prediction is expected to cost, as submit answers it: the ledger when
    something is billed already, else the expected price of the provider taking it
    (of the dearest candidate while none has: what the budget hold covers)."""
    spent = _ledger(run.pred, run.attempts)
    if spent:
        return spent
    router = api.service.router
    gen = req.to_generation(run.pred.seed)
    name = _provider_of(run)
    if name is not None and name in router.providers:
        return router.expected_cost(router.providers[name], gen)
    candidates = router.plan(gen, model=req.model, requested=req.providers).providers
    return max((router.expected_cost(p, gen) for p in candidates), default=0)


def estimated_time(api: Api, run: Run) -> str:
    """The provider's recent attempt latencies, 10th to 90th percentile, in whole
    seconds; the seed's "5-15s" until it has a few."""
    name = _provider_of(run)
    health = api.service.router.health.get(name) if name else None
    if health is None:
        return DEFAULT_ESTIMATE
    low = health.latency_percentile(10, ESTIMATE_MIN_SAMPLES)
    high = health.latency_percentile(90, ESTIMATE_MIN_SAMPLES)
    if low is None or high is None:
        return DEFAULT_ESTIMATE
    lo = math.floor(low)
    return f"{lo}-{max(lo + 1, math.ceil(high))}s"


def status_url(request: Request[Any, Any, Any], api: Api, prediction_id: str) -> str:
    return f"{base_url(request, api.settings).rstrip('/')}{PREFIX}/predictions/{prediction_id}"


def submit_view(request: Request[Any, Any, Any], api: Api, run: Run,
                req: GenerateRequest) -> VibeDreamSubmitted:
    pred = run.pred
    return VibeDreamSubmitted(
        id=pred.id,
        status="processing",  # the seed: submit "returns immediately"; poll for the rest
        status_url=status_url(request, api, pred.id),
        estimated_time=estimated_time(api, run),
        cost_cents=cents(quoted_micro_usd(api, run, req)),
        created_at=iso(pred.created_at),
    )


def _error_text(pred: Prediction) -> str | None:
    if pred.status == "canceled":
        return CANCELED_ERROR if not pred.error else f"{CANCELED_ERROR} ({pred.error})"
    if pred.status != "failed":
        return None
    if pred.error_kind == "policy_refusal":  # ErrorKind.POLICY: content moderation
        return MODERATION_ERROR
    return pred.error or GENERIC_ERROR


def poll_view(pred: Prediction, attempts: list[Attempt], base: str = ""
              ) -> VibeDreamPrediction:
    status = _STATUS.get(pred.status, "processing")
    done = status != "processing"
    return VibeDreamPrediction(
        id=pred.id,
        model_id=pred.model,
        model_name=MODEL_NAMES.get(pred.model, pred.model),
        status=status,
        outputs=output_urls(pred.outputs, base) if status == "completed" else None,
        error=_error_text(pred),
        created_at=iso(pred.created_at),
        completed_at=iso(pred.completed_at or pred.updated_at) if done else None,
        cost_cents=cents(_ledger(pred, attempts)),
    )


# --------------------------------------------------------------------------- handlers


class _GenerateOperation(Operation):
    """Documents the body we parse ourselves (VibeDream's fields, the proxy's ranges)."""

    def to_schema(self) -> dict[str, Any]:
        out = super().to_schema()
        props = GenerateRequest.model_json_schema()["properties"]
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["prompt"], "additionalProperties": False,
            "properties": {name: props[name] for name in FIELDS}}}}}
        return out


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {c: ResponseSpec(data_container=VibeDreamError, description="VibeDream error",
                            generate_examples=False) for c in codes}


@post("/models/{model:str}/generate", status_code=200, operation_class=_GenerateOperation,
      guards=[require_key], summary="VibeDream: submit a generation",
      responses={200: ResponseSpec(data_container=VibeDreamSubmitted, generate_examples=False,
                                   description="accepted: poll statusUrl"),
                 **_errors(400, 401, 402, 404, 409, 413, 422, 429, 503)})
async def generate(request: Request[Any, Any, Any], model: FromPath[str],
                   api: ApiDep) -> Response[Any]:
    if model not in api.settings.models:
        return vd_error(404, f"Model '{model}' not found")
    parsed = parse_body(await request.body(), model)
    if isinstance(parsed, Refusal):
        return refusal_error(parsed)
    refused = check_names(parsed, api.settings.models, list(api.provider_settings))
    if refused is not None:
        return refusal_error(refused)
    run = await admit(request, api, parsed, surface="vibedream")
    if isinstance(run, Refusal):
        return refusal_error(run)
    return Response(submit_view(request, api, run, parsed), headers=prediction_headers(run))


@get("/predictions/{prediction_id:str}", guards=[require_key],
     summary="VibeDream: get a prediction",
     responses={200: ResponseSpec(data_container=VibeDreamPrediction, generate_examples=False,
                                  description="the prediction"), **_errors(401, 404)})
async def get_prediction(request: Request[Any, Any, Any], prediction_id: FromPath[str],
                         api: ApiDep) -> Response[Any]:
    try:
        pred, attempts = await api.service.get(prediction_id, principal_of(request))
    except NotFound:
        return vd_error(404, "Prediction not found")
    return Response(poll_view(pred, attempts, base_url(request, api.settings)),
                    headers=prediction_headers(Run(pred=pred, attempts=attempts)))


_OTHER_METHODS: Any = ["PUT", "PATCH", "DELETE"]


@route("/models/{model:str}/generate", http_method=["GET", *_OTHER_METHODS],
       status_code=405, include_in_schema=False, sync_to_thread=False)
def generate_other_method(model: FromPath[str]) -> Response[Any]:
    return vd_error(405, "Method not allowed", {"Allow": "POST"})


@route("/predictions/{prediction_id:str}", http_method=["POST", *_OTHER_METHODS],
       status_code=405, include_in_schema=False, sync_to_thread=False)
def prediction_other_method(prediction_id: FromPath[str]) -> Response[Any]:
    return vd_error(405, "Method not allowed", {"Allow": "GET"})


@route("/{rest:path}", http_method=["GET", "POST", *_OTHER_METHODS], status_code=404,
       include_in_schema=False, sync_to_thread=False)
def not_found(rest: FromPath[str]) -> Response[Any]:
    return vd_error(404, "Not found")


vibedream_router = Router(
    path=PREFIX,
    route_handlers=[generate, get_prediction, generate_other_method, prediction_other_method,
                    not_found],
    tags=["vibedream"],
    exception_handlers={HTTPException: _http_exception, Exception: _internal_error},
)

HANDLERS: list[Any] = [vibedream_router]
