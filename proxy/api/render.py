"""Rows -> the one response shape."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request

from proxy.config import Settings
from proxy.schema import AttemptView, PredictionView, Progress, Urls, usd
from proxy.store.models import Attempt, Prediction


def attempt_view(a: Attempt) -> AttemptView:
    return AttemptView(
        provider=a.provider,
        upstream_id=a.upstream_id,
        status=a.status,
        error=a.error,
        error_kind=a.error_kind,
        latency_ms=a.latency_ms,
        cost_micro_usd=a.cost_micro_usd,
        cost_usd=usd(a.cost_micro_usd),
        created_at=a.created_at,
        completed_at=a.completed_at,
    )


def output_urls(outputs: list[str] | None, base_url: str) -> list[str]:
    """A prediction's outputs as a client uses them: the ones the proxy keeps
    (`output_store`) are stored as its own path, made absolute here with the base URL
    of whoever asks; provider URLs and data URIs are as they are."""
    base = base_url.rstrip("/")
    return [base + o if o.startswith("/") else o for o in outputs or []]


def prediction_view(p: Prediction, attempts: list[Attempt], base_url: str,
                    progress: tuple[int, int] | None = None) -> PredictionView:
    base = f"{base_url.rstrip('/')}/v1/predictions/{p.id}"
    # While running, cost is what the attempts have recorded so far.
    cost = p.cost_micro_usd or sum(a.cost_micro_usd for a in attempts)
    return PredictionView(
        id=p.id,
        model=p.model,
        status=p.status,  # type: ignore[arg-type]
        outputs=output_urls(p.outputs, base_url),
        has_nsfw_contents=list(p.has_nsfw_contents or []),
        seed=p.seed,
        provider=p.provider or (attempts[-1].provider if attempts else None),
        attempts=[attempt_view(a) for a in attempts],
        cost_micro_usd=cost,
        cost_usd=usd(cost),
        error=p.error,
        error_kind=p.error_kind,
        created_at=p.created_at,
        started_at=p.started_at,
        completed_at=p.completed_at,
        timings=dict(p.timings or {}),
        urls=Urls(get=base, cancel=f"{base}/cancel"),
        cancel_requested=bool(p.cancel_requested),
        surface=str((p.request or {}).get("surface", "native")),
        progress=Progress(step=progress[0], total=progress[1]) if progress else None,
    )


def webhook_body(p: Prediction, attempts: list[Attempt], base_url: str) -> bytes:
    """What a webhook receiver gets: the prediction as GET /v1/predictions/{id} shows it."""
    return msgspec.json.encode(prediction_view(p, attempts, base_url))


_BASE_URLS: dict[tuple[Any, ...], str] = {}  # what str(request.base_url) gave, per origin


def base_url(request: Request[Any, Any, Any], settings: Settings) -> str:
    """Where this client reaches us: `public_base_url`, else from the request."""
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
