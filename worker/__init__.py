"""The local GPU worker (`flux-proxy worker`): an HTTP job queue in front of one engine.

A service of its own: it imports ``common`` (media, logging) but never ``proxy`` or
``providers``, and only ``worker.engine`` imports torch / diffusers.

Modules: `settings` (WorkerSettings, env FLUX_WORKER_*), `spec` (JobSpec and the
engine's errors), `queue` (jobs, batching, cancel, GPU-seconds), `runner` (the
device section of a batch; the Engine and Checker protocols), `wire` (request
validation, job rendering), `app` (routes), `loader` (engine/checker from
settings), `inputs` / `images` (decode inputs, encode outputs), `safety` (NSFW
checkers and policy), `metrics`, `main` (`serve`), `testing` (FakeEngine), and
`engine/` (FluxEngine, speed options, tiny test models).
"""

from .settings import WorkerConfigError, WorkerSettings

__all__ = ["WorkerConfigError", "WorkerSettings"]
