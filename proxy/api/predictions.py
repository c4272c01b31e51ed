"""/v1/predictions: parse -> call the service -> render."""

from __future__ import annotations

import math
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation
from litestar.params import FromPath, FromQuery, QueryParameter
from pydantic import ValidationError

from proxy.accounts.auth import principal_of, require_key
from proxy.accounts.budgets import BudgetExceeded
from proxy.api.deps import ApiDep
from proxy.api.errors import error_response
from proxy.api.render import prediction_view
from proxy.config import Settings
from proxy.lifecycle.service import Conflict, NoProvider, NotFound, Unavailable
from proxy.schema import (
    ErrorResponse,
    FieldError,
    GenerateRequest,
    PredictionList,
    PredictionView,
    field_errors,
)
from proxy.store.models import PREDICTION_STATUSES


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {c: ResponseSpec(data_container=ErrorResponse, description="error") for c in codes}


_ONE = {200: ResponseSpec(data_container=PredictionView, description="the prediction")}


class _CreateOperation(Operation):
    """Documents the request body we parse ourselves (to report every bad field
    with its value and range, which typed parsing cannot)."""

    def to_schema(self) -> dict[str, Any]:
        out = super().to_schema()
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}},
        }
        return out


_BASE_URLS: dict[tuple[Any, ...], str] = {}  # what str(request.base_url) gave, per origin


def _base_url(request: Request[Any, Any, Any], settings: Settings) -> str:
    if settings.public_base_url:
        return settings.public_base_url
    # request.base_url builds a URL from a copy of the scope; the answer depends only on these.
    scope = request.scope
    key = (scope.get("scheme"), scope.get("server"), request.headers.get("host"),
           scope.get("app_root_path") or scope.get("root_path", ""))
    base = _BASE_URLS.get(key)
    if base is None:
        base = str(request.base_url)
        if len(_BASE_URLS) >= 256:  # the Host header is the client's: keep it bounded
            _BASE_URLS.clear()
        _BASE_URLS[key] = base
    return base


def parse_generate(
    raw: bytes, models: list[str], providers: list[str]
) -> GenerateRequest | Response[Any]:
    """The validated request, or the 400/422 response that says what is wrong."""
    try:
        req = GenerateRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(400, f"request body is not valid JSON: {errors[0]['msg']}",
                                  code="invalid_json")
        if any(e["type"] == "model_type" and not e["loc"] for e in errors):
            return error_response(422, "request body must be a JSON object",
                                  details=[FieldError(field="body", reason="not an object")])
        return error_response(422, "request validation failed", details=field_errors(exc))
    if req.model not in models:
        return error_response(422, "request validation failed", details=[
            FieldError(field="model", reason="unknown model", value=req.model,
                       allowed=f"one of {', '.join(models)}")])
    unknown = [p for p in req.providers or [] if p not in providers]
    if unknown:
        return error_response(422, "request validation failed", details=[
            FieldError(field="providers", reason=f"unknown provider(s): {', '.join(unknown)}",
                       value=req.providers, allowed=f"names from {', '.join(providers)}")])
    return req


class PredictionController(Controller):
    path = "/v1/predictions"
    tags = ["predictions"]
    guards = [require_key]

    @post(
        "",
        status_code=202,
        operation_class=_CreateOperation,
        responses={
            200: ResponseSpec(data_container=PredictionView,
                              description="sync mode: the terminal prediction"),
            202: ResponseSpec(data_container=PredictionView,
                              description="accepted (or still running after sync_timeout_s)"),
            **_errors(400, 401, 402, 413, 422, 429, 503),
        },
        summary="Create a prediction",
        description="202 with the queued prediction; with enable_sync_mode, 200 with the "
        "terminal result (or 202 with the running prediction after sync_timeout_s).",
    )
    async def create(self, request: Request[Any, Any, Any], api: ApiDep) -> Response[Any]:
        settings, service = api.settings, api.service
        parsed = parse_generate(await request.body(), settings.models,
                                list(api.provider_settings))
        if isinstance(parsed, Response):
            return parsed
        principal = principal_of(request)
        if principal.key is not None:
            wait = await api.auth.rate_limit(principal.key)
            if wait is not None:
                return error_response(
                    429, f"rate limit of key {principal.key.name!r} exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))})
        # Request images: decoded / address-checked before anything is written or sent.
        bad_images = await api.image_checker.check(parsed)
        if bad_images:
            return error_response(422, "request validation failed", details=bad_images)
        try:
            run = await service.submit(parsed, principal)
        except BudgetExceeded as exc:
            return error_response(402, str(exc), code="budget_exceeded")
        except Unavailable as exc:
            return error_response(503, str(exc), code="providers_unavailable", headers={
                "Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
        except NoProvider as exc:
            details = [FieldError(field=name, reason=why) for name, why in exc.reasons.items()]
            if not exc.configured:
                return error_response(503, str(exc), code="no_provider", details=details)
            return error_response(422, f"{exc}: " + "; ".join(
                f"{d.field}: {d.reason}" for d in details), code="unsupported", details=details)
        status = 202
        if parsed.enable_sync_mode and await service.wait(run, settings.sync_timeout_s):
            status = 200
        view = prediction_view(run.pred, list(run.attempts), _base_url(request, settings))
        return Response(view, status_code=status)

    @get("", summary="List predictions, newest first", responses={
        200: ResponseSpec(data_container=PredictionList, description="a page"),
        **_errors(401, 422)})
    async def list_predictions(
        self,
        request: Request[Any, Any, Any],
        api: ApiDep,
        status: FromQuery[str | None] = None,
        cursor: FromQuery[str | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
    ) -> Response[Any]:
        if status is not None and status not in PREDICTION_STATUSES:
            return error_response(422, "invalid query parameter", details=[
                FieldError(field="status", reason="unknown status", value=status,
                           allowed=", ".join(PREDICTION_STATUSES))])
        store = api.service.store
        try:
            principal = principal_of(request)
            preds, next_cursor = await store.list_predictions(
                status=status, api_key_id=None if principal.sees_all else principal.key_id,
                cursor=cursor, limit=limit,
            )
        except ValueError:
            return error_response(422, "invalid query parameter", details=[
                FieldError(field="cursor", reason="not a cursor from this API", value=cursor)])
        attempts = await store.attempts_for([p.id for p in preds])
        base = _base_url(request, api.settings)
        data = [prediction_view(p, attempts.get(p.id, []), base) for p in preds]
        return Response(PredictionList(data=data, next_cursor=next_cursor))

    @get("/{prediction_id:str}", summary="Get a prediction",
         responses={**_ONE, **_errors(401, 404)})
    async def get_prediction(
        self, request: Request[Any, Any, Any], prediction_id: FromPath[str], api: ApiDep,
    ) -> Response[Any]:
        try:
            pred, attempts = await api.service.get(prediction_id, principal_of(request))
        except NotFound:
            return error_response(404, f"no prediction {prediction_id}")
        return Response(prediction_view(pred, attempts, _base_url(request, api.settings)))

    @post("/{prediction_id:str}/cancel", status_code=200, summary="Cancel a prediction",
          responses={**_ONE, **_errors(401, 404, 409)})
    async def cancel(
        self, request: Request[Any, Any, Any], prediction_id: FromPath[str], api: ApiDep,
    ) -> Response[Any]:
        try:
            pred, attempts = await api.service.cancel(prediction_id, principal_of(request))
        except NotFound:
            return error_response(404, f"no prediction {prediction_id}")
        except Conflict as exc:
            return error_response(409, str(exc))
        return Response(prediction_view(pred, attempts, _base_url(request, api.settings)))

