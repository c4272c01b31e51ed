"""The worker's Prometheus metrics, on a registry of its own (one per app).

A registry per app keeps test apps apart and leaves the proxy's global registry
alone. Labels stay low-cardinality: status and outcome only, never ids or prompts.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NS = "flux_worker"
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs_submitted = Counter(f"{NS}_jobs_submitted_total", "Jobs accepted into the queue.",
                                      registry=r)
        self.jobs_rejected = Counter(f"{NS}_jobs_rejected_total",
                                     "Jobs refused at submit (queue full).", ["reason"],
                                     registry=r)
        self.jobs_finished = Counter(f"{NS}_jobs_total", "Jobs that reached a terminal status.",
                                     ["status"], registry=r)
        self.queue_depth = Gauge(f"{NS}_queue_depth", "Jobs waiting for the GPU.", registry=r)
        self.jobs_running = Gauge(f"{NS}_jobs_running", "Jobs in the pipeline call now.",
                                  registry=r)
        self.batch_jobs = Histogram(f"{NS}_batch_jobs", "Jobs per pipeline call.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_images = Histogram(f"{NS}_batch_images", "Images per pipeline call.",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.batches = Counter(f"{NS}_batches_total", "Pipeline calls by outcome.", ["outcome"],
                               registry=r)
        self.inference_seconds = Histogram(f"{NS}_inference_seconds",
                                           "Wall time of one pipeline call.",
                                           buckets=SECONDS_BUCKETS, registry=r)
        self.gpu_seconds = Counter(f"{NS}_gpu_seconds_total",
                                   "Device time attributed to jobs (what the proxy bills).",
                                   registry=r)
        self.images = Counter(f"{NS}_images_total", "Images delivered by completed jobs.",
                              registry=r)
        self.nsfw_images = Counter(f"{NS}_nsfw_images_total",
                                   "Delivered images the safety checker flagged.", registry=r)

        # Every series whose labels are known, at zero: rate() then counts the first one.
        for status in ("completed", "failed", "canceled"):
            self.jobs_finished.labels(status)
            self.batches.labels(status)
        self.jobs_rejected.labels("queue_full")

    def watch_queue(self, depth: Callable[[], int], running: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(depth()))
        self.jobs_running.set_function(lambda: float(running()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
