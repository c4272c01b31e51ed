"""The client's exceptions: one readable hierarchy, each carrying the proxy's error body.

    FluxProxyError              status, code, message, details, body, prediction
      ConnectError              the proxy could not be reached (status None)
      AuthError                 401 / 403
      NotFound                  404
      Conflict                  409 (cancel of a terminal prediction, key in use)
      ValidationError           400 / 422, `.details` names each bad field
        Unsupported             422 `unsupported`: no enabled provider can serve it
      BudgetExceeded            402, or a prediction that failed `budget_exceeded`
      RateLimited               429, `.retry_after` seconds
      Unavailable               503 (`.retry_after` when the proxy says)
        NoProvider              503 `no_provider`: none is enabled at all
      ServerError               other 5xx
      PredictionFailed          the prediction ended `failed` or `canceled`
        PolicyRefused           ... because of moderation or invalid input
      WaitTimeout               a wait gave up; `.prediction` is the last state seen
    ImageInputError (ValueError) a local image that is not an image (nothing was sent)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from flux_proxy._types import Prediction

# The prediction's error_kind values (providers/base.py ErrorKind) that mean "do not
# retry this request as it is": the provider refused its content or its inputs.
POLICY_KINDS = frozenset({"policy_refusal", "invalid_input"})


@dataclass(frozen=True, slots=True)
class FieldError:
    """One entry of an error's `details`."""

    field: str
    reason: str
    value: Any = None
    allowed: str | None = None


class FluxProxyError(Exception):
    """Base of every error the client raises about the proxy."""

    retryable = False  # whether the client's own retries try again

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 details: list[FieldError] | None = None, body: Any = None,
                 retry_after: float | None = None,
                 prediction: Prediction | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details or []
        self.body = body
        self.retry_after = retry_after
        self.prediction = prediction

    def __str__(self) -> str:
        head = " ".join(str(p) for p in (self.status, self.code) if p)
        head = f"{head}: " if head else ""
        fields = "; ".join(f"{d.field}: {d.reason}" for d in self.details)
        return f"{head}{self.message}" + (f" ({fields})" if fields else "")


class ConnectError(FluxProxyError):
    retryable = True


class AuthError(FluxProxyError):
    pass


class NotFound(FluxProxyError):
    pass


class Conflict(FluxProxyError):
    @property
    def retryable(self) -> bool:  # type: ignore[override]
        # An Idempotency-Key still being admitted: the proxy asks to come back shortly.
        return self.code == "idempotency_key_in_use"


class ValidationError(FluxProxyError):
    pass


class Unsupported(ValidationError):
    pass


class BudgetExceeded(FluxProxyError):
    pass


class RateLimited(FluxProxyError):
    retryable = True


class Unavailable(FluxProxyError):
    retryable = True


class NoProvider(Unavailable):
    retryable = False  # configuration, not a moment's outage


class ServerError(FluxProxyError):
    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.status in (502, 503, 504)


class PredictionFailed(FluxProxyError):
    pass


class PolicyRefused(PredictionFailed):
    pass


class WaitTimeout(FluxProxyError):
    pass


class ImageInputError(ValueError):
    """A local image input that is not a JPEG, PNG, GIF or WebP (nothing was sent)."""


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:  # an HTTP date: the proxy never sends one; treat as unknown
        return None


def error_from_response(response: httpx.Response) -> FluxProxyError:
    """The typed exception for an error answer, with the envelope's code and details."""
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    code = err.get("code") if isinstance(err.get("code"), str) else None
    message = err.get("message") if isinstance(err.get("message"), str) else None
    details = [FieldError(field=str(d.get("field", "")), reason=str(d.get("reason", "")),
                          value=d.get("value"), allowed=d.get("allowed"))
               for d in err.get("details") or [] if isinstance(d, dict)]
    cls: type[FluxProxyError]
    if status in (401, 403):
        cls = AuthError
    elif status == 402 or code == "budget_exceeded":
        cls = BudgetExceeded
    elif status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    elif status == 429:
        cls = RateLimited
    elif code == "unsupported":
        cls = Unsupported
    elif status in (400, 413, 422):
        cls = ValidationError
    elif code == "no_provider":
        cls = NoProvider
    elif status == 503:
        cls = Unavailable
    elif status >= 500:
        cls = ServerError
    else:
        cls = FluxProxyError
    return cls(message or f"HTTP {status}", status=status, code=code, details=details,
               body=body, retry_after=_retry_after(response))


def error_for_prediction(prediction: Prediction) -> FluxProxyError:
    """Why a terminal prediction did not complete, as the exception to raise."""
    kind = prediction.error_kind
    message = prediction.error or f"prediction {prediction.id} {prediction.status}"
    cls: type[FluxProxyError] = PredictionFailed
    if kind in POLICY_KINDS:
        cls = PolicyRefused
    elif kind == "budget_exceeded":
        cls = BudgetExceeded
    return cls(message, code=kind or prediction.status, body=prediction.raw,
               prediction=prediction)
