"""Rows -> the one response shape."""

from __future__ import annotations

from proxy.schema import AttemptView, PredictionView, Urls, usd
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


def prediction_view(p: Prediction, attempts: list[Attempt], base_url: str) -> PredictionView:
    base = f"{base_url.rstrip('/')}/v1/predictions/{p.id}"
    # While running, cost is what the attempts have recorded so far.
    cost = p.cost_micro_usd or sum(a.cost_micro_usd for a in attempts)
    return PredictionView(
        id=p.id,
        model=p.model,
        status=p.status,  # type: ignore[arg-type]
        outputs=list(p.outputs or []),
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
    )
