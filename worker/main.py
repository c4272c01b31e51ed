"""`flux-proxy worker`: check the settings, then serve the worker app with uvicorn."""

from __future__ import annotations

from .settings import WorkerSettings


def serve(settings: WorkerSettings) -> None:
    """Run the worker until interrupted. Raises WorkerConfigError (a message for the
    operator) before binding the port when the settings cannot work; model loading
    and warm-up happen in the app's start-up, before the first request."""
    import uvicorn

    from .app import create_worker_app

    settings.check()
    app = create_worker_app(settings)
    # One process: the queue, the batcher and the model live in its memory.
    uvicorn.run(app, host=settings.host, port=settings.port, workers=1, log_config=None,
                access_log=False, timeout_graceful_shutdown=15)
