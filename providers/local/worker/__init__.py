"""The local GPU worker (`flux-proxy worker`): an HTTP job queue in front of one engine.

Modules: `settings` (WorkerSettings, env FLUX_WORKER_*), `queue` (jobs, batching,
cancel, GPU-seconds), `wire` (request validation, job rendering), `app` (routes),
`loader` (engine/checker from settings), `metrics`, `main` (`serve`).
"""

from .settings import WorkerConfigError, WorkerSettings

__all__ = ["WorkerConfigError", "WorkerSettings"]
