"""/v1/predictions: parse -> call the service -> render."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation
from litestar.params import FromPath, FromQuery, QueryParameter

from proxy.accounts.auth import principal_of, require_key
from proxy.api.deps import ApiDep
from proxy.api.errors import error_response, refusal_response
from proxy.api.render import base_url, prediction_view
from proxy.api.submitting import (
    IDEMPOTENCY_HEADER,
    Refusal,
    admit,
    finish_sync,
    parse_native,
    prediction_headers,
)
from proxy.lifecycle.service import Conflict, NotFound
from proxy.schema import (
    ErrorResponse,
    FieldError,
    GenerateRequest,
    PredictionList,
    PredictionView,
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
        out.setdefault("parameters", []).append({
            "name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
            "description": "A repeat with the same key and body returns the first request's "
            "prediction (200) instead of a new one; the same key with another body is a 422. "
            "Scoped to the client key, kept idempotency_ttl_s.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255}})
        return out


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
            **_errors(400, 401, 402, 409, 413, 422, 429, 503),
        },
        summary="Create a prediction",
        description="202 with the queued prediction; with enable_sync_mode, 200 with the "
        "terminal result (or 202 with the running prediction after sync_timeout_s).",
    )
    async def create(self, request: Request[Any, Any, Any], api: ApiDep) -> Response[Any]:
        parsed = parse_native(await request.body(), api)
        if isinstance(parsed, Refusal):
            return refusal_response(parsed)
        run = await admit(request, api, parsed, surface="native")
        if isinstance(run, Refusal):
            return refusal_response(run)
        status = 202
        if parsed.enable_sync_mode and await finish_sync(api, run):
            status = 200
        if run.replayed:  # a repeat (same Idempotency-Key): the prediction as it now is
            status = 200
        view = prediction_view(run.pred, list(run.attempts), base_url(request, api.settings))
        return Response(view, status_code=status, headers=prediction_headers(run))

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
        base = base_url(request, api.settings)
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
        return Response(prediction_view(pred, attempts, base_url(request, api.settings),
                                        api.service.progress_of(pred.id)))

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
        return Response(prediction_view(pred, attempts, base_url(request, api.settings)))

