"""Errors of the OpenAI surface in OpenAI's shape and with its status codes:
``{"error": {"message", "type", "param", "code"}}``, the body the official SDK reads
into ``exc.message`` / ``.type`` / ``.param`` / ``.code``.

``x-should-retry`` (a header the SDK obeys before its own status rules,
openai/_base_client.py ``_should_retry``) is ``false`` wherever a retry cannot help or
would pay twice: an exhausted budget, a prediction still running past the sync wait
(a retry submits a second one), a failed prediction (the proxy has already failed
over across its providers), nothing configured at all.
"""

from __future__ import annotations

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException

from common.logging import get_logger
from proxy.api.submitting import Refusal
from proxy.schema import FieldError
from proxy.store.models import Prediction

log = get_logger("flux_proxy.api.openai")

INVALID = "invalid_request_error"
SERVER = "server_error"
NO_RETRY = {"x-should-retry": "false"}

# The unified schema's field -> the OpenAI parameter the caller sent it as.
PARAMS = {
    "num_images": "n",
    "mask_image": "mask",
    "enable_base64_output": "response_format",
}


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = INVALID,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, object]]:
    body: dict[str, object] = {
        "error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def bad_param(param: str | None, message: str, *, code: str = "invalid_value"
              ) -> Response[dict[str, object]]:
    """400 invalid_request_error naming the parameter."""
    return openai_error(400, message, param=param, code=code)


def _describe(err: FieldError) -> str:
    param = PARAMS.get(err.field, err.field)
    text = f"Invalid '{param}': {err.reason}"
    if err.value is not None and not isinstance(err.value, (dict, list)):
        text += f" (got {err.value!r})"
    if err.allowed:
        text += f"; allowed: {err.allowed}"
    return text


def refusal_error(refusal: Refusal) -> Response[dict[str, object]]:
    """A refusal of `admit` (or of parsing) as OpenAI would answer it."""
    kind, headers = refusal.kind, dict(refusal.headers)
    if kind == "invalid":
        field = refusal.field
        param = PARAMS.get(field, field) if field else None
        message = "; ".join(_describe(d) for d in refusal.details) or refusal.message
        return openai_error(400, message, param=param, code="invalid_value")
    if kind == "invalid_json":
        return openai_error(400, refusal.message, code="invalid_json")
    if kind == "rate_limited":  # the SDK retries a 429, after Retry-After
        return openai_error(429, f"Rate limit reached: {refusal.message}", type_="requests",
                            code="rate_limit_exceeded", headers=headers)
    if kind == "budget":  # OpenAI's exhausted quota: a 429 the SDK must not retry
        return openai_error(429, f"You exceeded your current quota: {refusal.message}",
                            type_="insufficient_quota", code="insufficient_quota",
                            headers={**headers, **NO_RETRY})
    if kind == "unavailable":  # the SDK retries a 503, after Retry-After
        return openai_error(503, refusal.message, type_=SERVER, code="service_unavailable",
                            headers=headers)
    if kind == "unsupported":
        return openai_error(400, refusal.message, code="unsupported_request")
    if kind == "conflict":  # the SDK retries a 409, after Retry-After
        return openai_error(409, refusal.message, code=refusal.code, headers=headers)
    # no_provider: nothing is enabled; no retry changes that.
    return openai_error(503, refusal.message, type_=SERVER, code="no_provider",
                        headers={**headers, **NO_RETRY})


def failure_error(pred: Prediction, headers: dict[str, str]) -> Response[dict[str, object]]:
    """A prediction that ended without images."""
    headers = {**headers, **NO_RETRY}
    why = pred.error or "the prediction failed"
    if pred.status == "canceled":
        return openai_error(409, f"The prediction {pred.id} was canceled: {why}",
                            code="prediction_canceled", headers=headers)
    kind = pred.error_kind
    if kind == "policy_refusal":  # what OpenAI's safety system answers
        return openai_error(400, f"Your request was rejected by the safety system: {why}",
                            code="content_policy_violation", headers=headers)
    if kind == "invalid_input":
        return openai_error(400, why, code="invalid_value", headers=headers)
    if kind == "budget_exceeded":
        return openai_error(429, f"You exceeded your current quota: {why}",
                            type_="insufficient_quota", code="insufficient_quota",
                            headers=headers)
    return openai_error(502, f"The upstream image provider failed: {why}", type_=SERVER,
                        code="upstream_error", headers=headers)


def http_error(request: Request, exc: HTTPException) -> Response[dict[str, object]]:
    """Litestar's own exceptions on these routes: the key guard's 401, 413, 405, a
    multipart that does not parse, the decode-budget 503."""
    status = exc.status_code
    headers = dict(exc.headers or {})
    if isinstance(exc, NotAuthorizedException):  # OpenAI's answer to a bad or missing key
        return openai_error(401, f"Incorrect API key provided: {exc.detail}",
                            code="invalid_api_key", headers=headers)
    if status == 413:
        limit = request.app.state.settings.max_body_bytes
        return openai_error(413, f"The request body is larger than this proxy accepts "
                            f"({limit} bytes, max_body_bytes)", code="request_too_large",
                            headers=headers)
    if status >= 500:
        return openai_error(status, str(exc.detail), type_=SERVER, headers=headers)
    return openai_error(status, str(exc.detail), headers=headers)


def internal_error(request: Request, exc: Exception) -> Response[dict[str, object]]:
    log.exception("http.unhandled", path=request.url.path, error_type=type(exc).__name__)
    return openai_error(500, "The server had an error while processing your request.",
                        type_=SERVER)


EXCEPTION_HANDLERS = {HTTPException: http_error, Exception: internal_error}
