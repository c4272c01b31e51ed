"""Every Prometheus metric, defined once. Labels stay low-cardinality:
provider, model, status, operation, outcome; never ids, keys or prompts."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

NS = "flux_proxy"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)

PREDICTIONS_ACCEPTED = Counter(
    f"{NS}_predictions_accepted_total", "Predictions accepted.", ["model"]
)
PREDICTIONS_FINISHED = Counter(
    f"{NS}_predictions_total",
    "Predictions that reached a terminal status.",
    ["model", "provider", "status"],
)
PREDICTIONS_IN_FLIGHT = Gauge(
    f"{NS}_predictions_in_flight", "Non-terminal predictions driven by this process."
)
PREDICTION_DURATION = Histogram(
    f"{NS}_prediction_duration_seconds",
    "Accepted to terminal, per final provider.",
    ["model", "provider", "status"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_LATENCY = Histogram(
    f"{NS}_upstream_request_duration_seconds",
    "One HTTP call to an upstream (submit, poll, download).",
    ["provider", "operation", "outcome"],
    buckets=LATENCY_BUCKETS,
)
ATTEMPTS = Counter(
    f"{NS}_attempts_total", "Upstream attempts by outcome.", ["provider", "outcome"]
)
COST_MICRO_USD = Counter(
    f"{NS}_cost_micro_usd_total", "Money recorded on attempts, micro-USD.", ["provider", "model"]
)
BREAKER_STATE = Gauge(
    f"{NS}_breaker_state", "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.",
    ["provider"],
)
FAILOVERS = Counter(
    f"{NS}_failovers_total",
    "A prediction moved to another provider after a retryable failure.",
    ["from", "to", "reason"],
)
HEDGES = Counter(
    f"{NS}_hedges_total", "Hedged requests started (the primary was slow).", ["provider"]
)
COST_USD = Counter(
    f"{NS}_cost_usd_total", "Money recorded on attempts, USD (exact figures: the spend API).",
    ["provider", "model", "key_name"],
)
IMAGES = Counter(f"{NS}_images_total", "Images delivered by completed attempts.", ["provider"])
BUDGET_REMAINING_USD = Gauge(
    f"{NS}_budget_remaining_usd", "Budget left this period (after in-flight reservations).",
    ["key_name"],
)
