"""One error envelope for every failure: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from common.logging import get_logger
from proxy.api.submitting import Refusal
from proxy.schema import ErrorBody, ErrorResponse, FieldError
from proxy.store import outage

log = get_logger("flux_proxy.api")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    402: "payment_required",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    details: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[ErrorResponse]:
    return Response(
        ErrorResponse(ErrorBody(code=code or _CODES.get(status, "error"), message=message,
                                details=details)),
        status_code=status,
        media_type=MediaType.JSON,
        headers=headers,
    )


def refusal_response(refusal: Refusal) -> Response[ErrorResponse]:
    """A refusal in the native envelope."""
    return error_response(refusal.status, refusal.message, code=refusal.code,
                          details=refusal.details or None, headers=refusal.headers or None)


def http_exception_handler(_: Request, exc: HTTPException) -> Response[ErrorResponse]:
    details = None
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list):
        details = [
            FieldError(field=str(e.get("key", "")), reason=str(e.get("message", "")))
            for e in exc.extra
            if isinstance(e, dict)
        ]
    headers = dict(exc.headers or {})
    return error_response(exc.status_code, str(exc.detail), details=details, headers=headers)


def internal_error_handler(request: Request, exc: Exception) -> Response[ErrorResponse]:
    if outage.is_outage(exc):
        # Retryable: with an Idempotency-Key a retry cannot make a second prediction.
        log.warning("http.database_unavailable", path=request.url.path,
                    error_type=type(exc).__name__)
        return error_response(503, "the database is not answering; retry shortly",
                              code="database_unavailable", headers={"Retry-After": "1"})
    log.exception("http.unhandled", path=request.url.path, error_type=type(exc).__name__)
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal error", code="internal")
