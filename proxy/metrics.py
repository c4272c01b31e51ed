"""Every Prometheus metric, defined once. Labels stay low-cardinality:
provider, model, status, operation, outcome; never ids, keys or prompts.

Under `serve --workers N` (N > 1) every worker writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (a folder the supervisor makes and removes;
prometheus-client's multiprocess mode) and `/metrics` sums them over the
workers (`exposition`): counters and histograms add up, dead workers' counts
included; each gauge says how its workers' values combine (`multiprocess_mode`).
One process: the default registry, as always.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

NS = "flux_proxy"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)

PREDICTIONS_ACCEPTED = Counter(
    f"{NS}_predictions_accepted_total",
    "Predictions accepted, by the wire format they came in (native, openai, wavespeed, "
    "vibedream).", ["model", "surface"]
)
PREDICTIONS_FINISHED = Counter(
    f"{NS}_predictions_total",
    "Predictions that reached a terminal status.",
    ["model", "provider", "status", "surface"],
)
PREDICTIONS_IN_FLIGHT = Gauge(
    f"{NS}_predictions_in_flight", "Non-terminal predictions being driven (all live workers).",
    multiprocess_mode="livesum",
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
    f"{NS}_breaker_state", "Circuit breaker per provider: 0 closed, 1 half-open, 2 open "
    "(the worst any live worker sees).",
    ["provider"], multiprocess_mode="livemax",
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
    ["key_name"], multiprocess_mode="mostrecent",  # read from the database: the latest wins
)


def multiprocess_dir() -> str | None:
    """The folder the workers' samples are in, when this is one of several workers."""
    return os.environ.get(MULTIPROC_DIR_ENV) or None


# prometheus-client chose files or memory for the values when it was imported; so do we.
_MULTIPROCESS = multiprocess_dir() is not None
_registry: CollectorRegistry | None = None


def exposition() -> bytes:
    """The /metrics page: this process's metrics, or every worker's together."""
    global _registry
    if not _MULTIPROCESS:
        return generate_latest(REGISTRY)
    if _registry is None:
        _registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(_registry)
    return generate_latest(_registry)
