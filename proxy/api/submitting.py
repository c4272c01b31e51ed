"""Admitting one generation request, whatever wire format it came in (the native
/v1/predictions, OpenAI's images API, WaveSpeed's or VibeDream's): the checks after
parsing, then `service.submit`. Every surface calls `admit`; none has its own
lifecycle, ledger or budget. A refusal is a plain value (`Refusal`) that each
surface renders in its own error shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from litestar import Request
from pydantic import ValidationError

from common import media
from proxy import uploads
from proxy.accounts.auth import Principal, principal_of
from proxy.accounts.budgets import BudgetExceeded
from proxy.api import render, request_context
from proxy.api.deps import Api
from proxy.lifecycle.idempotency import IdempotencyInProgress, IdempotencyMismatch
from proxy.lifecycle.run import Run
from proxy.lifecycle.service import NoProvider, Unavailable
from proxy.lifecycle.webhooks import NoSigningSecret
from proxy.schema import (
    ALLOWED,
    FieldError,
    GenerateRequest,
    field_errors,
    redact_image_ref,
    usd,
)

Surface = Literal["native", "openai", "wavespeed", "vibedream"]
SURFACES: tuple[Surface, ...] = ("native", "openai", "wavespeed", "vibedream")

# What a refusal is, so a surface can map it onto its own codes.
RefusalKind = Literal[
    "invalid_json",     # 400: the body is not JSON
    "invalid",          # 422: a field is wrong (details say which)
    "rate_limited",     # 429 + Retry-After
    "budget",           # 402: the key's budget cannot cover the request
    "unavailable",      # 503 + Retry-After: every eligible provider is open / cooling down
    "no_provider",      # 503: nothing is enabled at all
    "unsupported",      # 422: no enabled provider can serve this request
    "conflict",         # 409: the Idempotency-Key's first request is still being admitted
]


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted. Nothing was written or sent."""

    kind: RefusalKind
    status: int
    message: str
    code: str
    details: list[FieldError] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def field(self) -> str | None:
        """The first offending field, for surfaces that name one (OpenAI's `param`)."""
        return self.details[0].field if self.details else None


def invalid(message: str, details: list[FieldError]) -> Refusal:
    return Refusal("invalid", 422, message, "validation_error", details)


def from_validation_error(exc: ValidationError) -> Refusal:
    """A pydantic error on GenerateRequest (or a surface's own model) as a refusal."""
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return Refusal("invalid_json", 400,
                       f"request body is not valid JSON: {errors[0]['msg']}", "invalid_json")
    if any(e["type"] == "model_type" and not e["loc"] for e in errors):
        return invalid("request body must be a JSON object",
                       [FieldError(field="body", reason="not an object")])
    return invalid("request validation failed", field_errors(exc))


def check_names(req: GenerateRequest, models: list[str], providers: list[str]) -> Refusal | None:
    """The model and pinned providers must be ones this proxy has."""
    if req.model not in models:
        return invalid("request validation failed", [
            FieldError(field="model", reason="unknown model", value=req.model,
                       allowed=f"one of {', '.join(models)}")])
    unknown = [p for p in req.providers or [] if p not in providers]
    if unknown:
        return invalid("request validation failed", [
            FieldError(field="providers", reason=f"unknown provider(s): {', '.join(unknown)}",
                       value=req.providers, allowed=f"names from {', '.join(providers)}")])
    return None


def parse_native(raw: bytes, api: Api) -> GenerateRequest | Refusal:
    """The native JSON body, validated, with known model and providers."""
    try:
        req = GenerateRequest.model_validate_json(raw)
    except ValidationError as exc:
        return from_validation_error(exc)
    return check_names(req, api.settings.models, list(api.provider_settings)) or req


IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")  # 1-255 printable ASCII


def idempotency_key(request: Request[Any, Any, Any]) -> str | Refusal | None:
    """The request's Idempotency-Key header, checked (None: it has none)."""
    raw = request.headers.get(IDEMPOTENCY_HEADER)
    if raw is None or _IDEMPOTENCY_KEY.fullmatch(raw):
        return raw
    return invalid(f"invalid {IDEMPOTENCY_HEADER} header", [FieldError(
        field=IDEMPOTENCY_HEADER, reason="not a valid idempotency key", value=raw[:64],
        allowed="1 to 255 printable ASCII characters")])


async def admit(
    request: Request[Any, Any, Any], api: Api, req: GenerateRequest, *, surface: Surface
) -> Run | Refusal:
    """Rate limit, request images, then `service.submit` (routing, budget, the row).
    The prediction is committed before this returns a Run. With an Idempotency-Key,
    a repeat of the same request returns the first's prediction (`run.replayed`),
    without counting against the key's rate limit."""
    key = idempotency_key(request)
    if isinstance(key, Refusal):
        return key
    principal = principal_of(request)
    if key is not None:  # a repeat is answered from the first: no rate limit, no checks
        try:
            replayed = await api.service.find_replay(req, principal, surface=surface,
                                                     idempotency_key=key)
        except IdempotencyInProgress as exc:
            return Refusal("conflict", 409, str(exc), "idempotency_key_in_use",
                           headers={"Retry-After": "1"})
        if replayed is not None:
            return replayed
    if principal.key is not None:
        wait = await api.auth.rate_limit(principal.key)
        if wait is not None:
            return Refusal("rate_limited", 429,
                           f"rate limit of key {principal.key.name!r} exceeded", "rate_limited",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
    # The proxy's own upload URLs (WaveSpeed's media routes): a public URL or a data URI.
    resolved = await uploads.resolve_images(req, api.settings,
                                            request_base=lambda: str(request.base_url))
    if isinstance(resolved, list):
        return invalid("request validation failed", resolved)
    req = resolved
    # Decoded / address-checked before anything is written or sent.
    bad_images = await api.image_checker.check(req)
    if bad_images:
        return invalid("request validation failed", bad_images)
    if req.webhook is not None and (refused := await _check_webhook(api, req, principal)):
        return refused
    try:
        return await api.service.submit(req, principal, surface=surface, idempotency_key=key,
                                        base_url=render.base_url(request, api.settings))
    except IdempotencyMismatch as exc:
        return Refusal("invalid", 422, str(exc), "idempotency_key_reused", [FieldError(
            field=IDEMPOTENCY_HEADER, reason="already used for a different request",
            value=exc.key)])
    except IdempotencyInProgress as exc:
        return Refusal("conflict", 409, str(exc), "idempotency_key_in_use",
                       headers={"Retry-After": "1"})
    except BudgetExceeded as exc:
        return Refusal("budget", 402, str(exc), "budget_exceeded")
    except Unavailable as exc:
        return Refusal("unavailable", 503, str(exc), "providers_unavailable",
                       headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
    except NoProvider as exc:
        details = [FieldError(field=name, reason=why) for name, why in exc.reasons.items()]
        if not exc.configured:
            return Refusal("no_provider", 503, str(exc), "no_provider", details)
        return Refusal("unsupported", 422, f"{exc}: " + "; ".join(
            f"{d.field}: {d.reason}" for d in details), "unsupported", details)


async def _check_webhook(api: Api, req: GenerateRequest, principal: Principal
                         ) -> Refusal | None:
    """The webhook URL passes the outbound guard, and there is a secret to sign with."""
    dispatcher = api.webhooks
    has_secret = (bool(principal.key.webhook_secret) if principal.key is not None
                  else dispatcher.keyless_ok())
    try:
        await dispatcher.check(req, has_secret)
    except NoSigningSecret as exc:
        return invalid("request validation failed", [FieldError(
            field="webhook", reason=str(exc), value=None, allowed=ALLOWED["webhook"])])
    except media.MediaError as exc:  # BlockedURL too
        return invalid("request validation failed", [FieldError(
            field="webhook", reason=exc.reason, value=redact_image_ref(req.webhook or ""),
            allowed=ALLOWED["webhook"])])
    return None


async def finish_sync(api: Api, run: Run, timeout_s: float | None = None) -> bool:
    """Wait for the terminal state (at most `sync_timeout_s`); True when it came. The
    time the wait spent on upstream attempts is left out of the request's
    x-flux-proxy-overhead-ms (api/request_context.py)."""
    done = await api.service.wait(run, api.settings.sync_timeout_s if timeout_s is None
                                  else timeout_s)
    request_context.waited_on(run)
    return done


# Every surface answers with these, so a caller of any wire format can find the
# prediction (GET /v1/predictions/{id}) and what it cost.
PREDICTION_ID_HEADER = "X-Flux-Prediction-Id"
COST_HEADER = "X-Flux-Cost-USD"
PROVIDER_HEADER = "X-Flux-Provider"


def prediction_headers(run: Run) -> dict[str, str]:
    """The proxy's own id, cost so far (exact decimal USD) and provider of a run."""
    pred = run.pred
    cost = pred.cost_micro_usd or sum(a.cost_micro_usd for a in run.attempts)
    headers = {PREDICTION_ID_HEADER: pred.id, COST_HEADER: usd(cost)}
    provider = pred.provider or (run.attempts[-1].provider if run.attempts else None)
    if provider:
        headers[PROVIDER_HEADER] = provider
    return headers
