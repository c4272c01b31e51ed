"""Every Prometheus metric, defined once. Labels stay low-cardinality and closed:
provider, model, surface, status, operation, outcome, reason (an error kind), key
name; never ids, prompts or URLs.

`precreate` makes every series whose labels are known at start (each provider x
model x status ..., at zero), so a rate or a ratio is right from the first request:
a counter that appears only with its first increment makes `rate()` miss it.

Under `serve --workers N` (N > 1) every worker writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (a folder the supervisor makes and removes;
prometheus-client's multiprocess mode) and `/metrics` sums them over the
workers (`exposition`): counters and histograms add up, dead workers' counts
included; each gauge says how its workers' values combine (`multiprocess_mode`).
One process: the default registry, as always.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

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
# Image generation end to end: 1-120 s matter, with the fast simulators' tens of ms below.
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120,
                      180, 300, 600)
# The proxy's own time per request: fractions of a millisecond to a second.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1)

# Closed label values (pre-created; anything else is folded into "other").
SURFACES = ("native", "openai", "wavespeed", "vibedream")
FINAL_STATUSES = ("completed", "failed", "canceled")
OPERATIONS = ("submit", "poll", "download", "cancel")
ATTEMPT_OUTCOMES = ("completed", "canceled", "unknown", "unavailable", "rate_limited",
                    "timeout", "outcome_unknown", "malformed_response", "auth",
                    "policy_refusal", "invalid_input", "budget_exceeded", "configuration_error")
REASONS = ("unavailable", "rate_limited", "timeout", "outcome_unknown", "malformed_response",
           "auth", "policy_refusal", "invalid_input", "budget_exceeded", "configuration_error")
# Why money bought no delivered image: an attempt billed though it failed, was
# canceled or its outcome is unknown; a hedge that lost the race.
WASTE_REASONS = ("failed_billed", "canceled", "outcome_unknown", "hedge_lost")
HEDGE_RESULT_VALUES = ("won", "lost")
# What became of each output the proxy tried to keep (output_store): stored, or why it
# kept its provider URL.
OUTPUT_COPY_RESULTS = ("stored", "too_large", "not_image", "download_failed", "store_failed",
                       "timeout")

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
QUEUE_WAIT = Histogram(
    f"{NS}_queue_wait_seconds",
    "Accepted to its first upstream attempt (waiting for a provider slot or a cooldown).",
    ["model"], buckets=LATENCY_BUCKETS,
)
PROXY_OVERHEAD = Histogram(
    f"{NS}_overhead_seconds",
    "Time the proxy itself spent on a request: the request's wall time less the time its "
    "prediction's upstream attempts took while it waited (also x-flux-proxy-overhead-ms).",
    ["surface", "mode"], buckets=OVERHEAD_BUCKETS,
)
PREDICTIONS_IN_FLIGHT = Gauge(
    f"{NS}_predictions_in_flight", "Non-terminal predictions being driven (all live workers).",
    multiprocess_mode="livesum",
)
PREDICTION_DURATION = Histogram(
    f"{NS}_prediction_duration_seconds",
    "Accepted to terminal, per final provider.",
    ["model", "provider", "status"],
    buckets=GENERATION_BUCKETS,
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
RETRIES = Counter(
    f"{NS}_retries_total",
    "A prediction tried the same provider again after a retryable failure (not a failover).",
    ["provider", "reason"],
)
HEDGES = Counter(
    f"{NS}_hedges_total", "Hedged requests started (the primary was slow), by the slow "
    "primary's provider.", ["provider"]
)
HEDGE_RESULTS = Counter(
    f"{NS}_hedge_results_total",
    "Started hedges by result, by the primary's provider: won (the hedge's images were "
    "delivered) or lost (the primary's were, or neither); the loser's cost is wasted cost.",
    ["provider", "result"],
)
WASTED_COST_USD = Counter(
    f"{NS}_wasted_cost_usd_total",
    "Money recorded on attempts whose images were not delivered, by reason.",
    ["provider", "reason"],
)
COST_USD = Counter(
    f"{NS}_cost_usd_total", "Money recorded on attempts, USD (exact figures: the spend API).",
    ["provider", "model", "key_name"],
)
IMAGES = Counter(f"{NS}_images_total", "Images delivered by completed attempts.", ["provider"])
NSFW_IMAGES = Counter(f"{NS}_nsfw_images_total",
                      "Delivered images the provider flagged NSFW.", ["provider"])
OUTPUT_COPIES = Counter(
    f"{NS}_output_copies_total",
    "Outputs copied into output_store (result stored), or left at the provider's URL, by why.",
    ["result"],
)
BUDGET_REMAINING_USD = Gauge(
    f"{NS}_budget_remaining_usd", "Budget left this period (after in-flight reservations).",
    ["key_name"], multiprocess_mode="mostrecent",  # read from the database: the latest wins
)
BUDGET_USD = Gauge(
    f"{NS}_budget_usd", "A key's budget per period (keys with a budget).",
    ["key_name"], multiprocess_mode="mostrecent",
)


def precreate(providers: Iterable[str], models: Iterable[str]) -> None:
    """Every series whose label values are known at start, at zero."""
    providers, models = list(providers), list(models)
    for model in models:
        QUEUE_WAIT.labels(model)
        for surface in SURFACES:
            PREDICTIONS_ACCEPTED.labels(model, surface)
    for result in OUTPUT_COPY_RESULTS:
        OUTPUT_COPIES.labels(result)
    for surface in SURFACES:
        for mode in ("sync", "async"):
            PROXY_OVERHEAD.labels(surface, mode)
    for provider in (*providers, "none"):  # "none": failed before any provider took it
        for model in models:
            for status in FINAL_STATUSES:
                PREDICTION_DURATION.labels(model, provider, status)
                for surface in SURFACES:
                    PREDICTIONS_FINISHED.labels(model, provider, status, surface)
    for provider in providers:
        IMAGES.labels(provider)
        NSFW_IMAGES.labels(provider)
        HEDGES.labels(provider)
        for result in HEDGE_RESULT_VALUES:
            HEDGE_RESULTS.labels(provider, result)
        for outcome in ATTEMPT_OUTCOMES:
            ATTEMPTS.labels(provider, outcome)
        for reason in REASONS:
            RETRIES.labels(provider, reason)
            for other in providers:
                if other != provider:
                    FAILOVERS.labels(provider, other, reason)
        for reason in WASTE_REASONS:
            WASTED_COST_USD.labels(provider, reason)
        for model in models:
            COST_MICRO_USD.labels(provider, model)
        for operation in OPERATIONS:
            for outcome in ("ok", *REASONS, "error"):
                UPSTREAM_LATENCY.labels(provider, operation, outcome)


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


def precreate_keys(providers: Iterable[str], models: Iterable[str],
                   key_names: Iterable[str]) -> None:
    """The per-key cost series of these keys ("none": requests without a key), at zero."""
    providers, models = list(providers), list(models)
    for key_name in (*key_names, "none"):
        for provider in providers:
            for model in models:
                COST_USD.labels(provider, model, key_name)
