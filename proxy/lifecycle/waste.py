"""Wasted cost: money recorded on attempts whose images the client did not get
(`flux_proxy_wasted_cost_usd_total{provider, reason}`), each attempt counted once.

Counted when the prediction ends, and again when a hedge loser that was still
running then settles (hedging._settle_later): attempts not yet ended are left for
that second count.
"""

from __future__ import annotations

from proxy import metrics
from proxy.lifecycle.run import Run
from proxy.store.models import Attempt

HEDGE_LOST_PREFIX = "hedge lost"  # the reason hedging fires on a loser's cancel signal


def reason_of(attempt: Attempt) -> str | None:
    """Why a billed, undelivered attempt bought nothing; None while it is still running."""
    if attempt.status == "completed":
        return "hedge_lost"  # completed, but another attempt's images were delivered
    if attempt.status == "canceled":
        return "hedge_lost" if (attempt.error or "").startswith(HEDGE_LOST_PREFIX) \
            else "canceled"
    if attempt.status == "unknown" or attempt.error_kind == "outcome_unknown":
        return "outcome_unknown"
    if attempt.status == "failed":
        return "failed_billed"
    return None


def count_waste(run: Run, delivered: Attempt | None) -> None:
    """Add every ended, billed attempt of `run` other than `delivered` (not yet counted)."""
    for attempt in run.attempts:
        if attempt is delivered or not attempt.cost_micro_usd or attempt.id in run.wasted:
            continue
        reason = reason_of(attempt)
        if reason is None:
            continue
        if attempt.id is not None:
            run.wasted.add(attempt.id)
        metrics.WASTED_COST_USD.labels(attempt.provider, reason).inc(
            attempt.cost_micro_usd / 1_000_000)
