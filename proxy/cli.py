"""`flux-proxy serve | db upgrade | simulate ...`"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from .config import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """flux-proxy: one endpoint for FLUX.1 [dev] across providers."""


def _settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    from .config import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except (ValidationError, ValueError) as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)


@main.command()
@click.option("--host", default=None, help="Bind address (default 127.0.0.1, FLUX_PROXY_HOST).")
@click.option("--port", type=int, default=None, help="Port (default 8080, FLUX_PROXY_PORT).")
@click.option("--log-level", default=None,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(host: str | None, port: int | None, log_level: str | None) -> None:
    """Apply migrations and serve the proxy."""
    import uvicorn

    from .app import create_app

    settings = _settings(host=host, port=port, log_level=log_level)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                access_log=False, proxy_headers=True, server_header=False)


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply Alembic migrations to FLUX_PROXY_DATABASE_URL."""
    from .store.repo import Store

    settings = _settings()

    async def run() -> None:
        store = Store(settings.database_url)
        try:
            await store.upgrade()
        finally:
            await store.dispose()

    asyncio.run(run())
    click.echo("database is at the latest revision")


@main.command()
@click.argument("kind", type=click.Choice(["vibedream", "wavespeed"]))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=9000, show_default=True)
@click.option("--job-latency", type=float, default=None, help="Seconds until a job completes.")
@click.option("--error-rate", type=float, default=None, help="Fraction of submits answered 500.")
@click.option("--api-key", default=None, help="Bearer key the simulator requires.")
def simulate(kind: str, host: str, port: int, job_latency: float | None,
             error_rate: float | None, api_key: str | None) -> None:
    """Run a wire-faithful VibeDream or WaveSpeed simulator (for tests and offline work)."""
    from providers.simulators import SimConfig
    from providers.simulators import serve as sim_serve

    config = SimConfig()
    if job_latency is not None:
        config.job_latency_s = job_latency
    if error_rate is not None:
        config.error_rate = error_rate
    if api_key is not None:
        config.api_key = api_key
    sim_serve(kind, host=host, port=port, config=config)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
