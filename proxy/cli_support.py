"""Shared by the CLI's commands: settings resolved as `serve` does, the database a
command uses (and saying which), running async work, and a running proxy's API."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from proxy.accounts.auth import Auth
    from proxy.config import Settings
    from proxy.store.repo import Store


def _settings(**overrides: Any) -> Settings:
    """Settings as `serve` resolves them (environment, FLUX_PROXY_CONFIG's file,
    defaults); a configuration error ends the command with status 2."""
    from pydantic import ValidationError

    from proxy.config import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(map(str, e["loc"]))
            message = e["msg"].removeprefix("Value error, ")
            click.echo(f"configuration error: {where + ': ' if where else ''}{message}", err=True)
        sys.exit(2)
    except ValueError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)


def _which_database(settings: Settings, *, create: bool) -> None:
    """Say on stderr which database this command uses (password masked). Without
    `create`, refuse a SQLite file that does not exist rather than make a new one."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    from proxy.config import CONFIG_VARIABLE, setting_source
    from proxy.store.db import normalize_url

    try:
        url = make_url(normalize_url(settings.database_url))
    except ValueError as exc:
        click.echo(f"configuration error: database_url: {exc}", err=True)
        sys.exit(2)
    source = setting_source("database_url")
    source = "the default" if source == "default" else source
    path = url.database or ""
    if url.get_backend_name() == "sqlite" and path not in ("", ":memory:") \
            and not path.startswith("file:"):
        file = Path(path).absolute()
        url = url.set(database=str(file))
        if not create and not file.exists():
            raise click.ClickException(
                f"no database at {file} (database_url {settings.database_url!r} from {source}"
                f"{'' if Path(path).is_absolute() else ', relative to the current folder'}). Point "
                f"FLUX_PROXY_DATABASE_URL (or database_url in the {CONFIG_VARIABLE} file) at the "
                "proxy's database, or use --url with the admin key to ask a running proxy; "
                "`flux-proxy db upgrade` creates a new database.")
    click.echo(f"database: {url.render_as_string(hide_password=True)} (from {source})", err=True)


def _run_async(work: Coroutine[Any, Any, None]) -> None:
    """Run `work`; a database that cannot be reached ends the command with its reason."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        asyncio.run(work)
    except (OSError, SQLAlchemyError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise click.ClickException(f"database error: {reason}") from None


def _run_with_store(fn: Callable[[Store, Settings], Awaitable[None]]) -> None:
    """Run `fn` against the configured database (migrated first); never creates one."""
    from proxy.store.repo import Store

    settings = _settings()
    _which_database(settings, create=False)

    async def run() -> None:
        store = Store(settings.database_url)
        try:
            await store.upgrade()
            await fn(store, settings)
        finally:
            await store.dispose()

    _run_async(run())


def _auth(store: Store, settings: Settings) -> Auth:
    from proxy.accounts.auth import Auth

    secret = settings.key_secret.get_secret_value() if settings.key_secret else None
    return Auth(store, enabled=True, admin_key=None, key_secret=secret)


# --------------------------------------------------------------------------- --url: the admin API


def _remote_options(fn: Callable[..., None]) -> Callable[..., None]:
    fn = click.option(
        "--admin-key", default=None, metavar="KEY",
        help="The proxy's admin key for --url (default: FLUX_PROXY_ADMIN_KEY, or admin_key "
             "in the FLUX_PROXY_CONFIG file; prefer those: arguments show in `ps`).")(fn)
    return click.option(
        "--url", default=None, metavar="URL",
        help="A running proxy (e.g. http://127.0.0.1:8080): use its admin API, not the "
             "database.")(fn)


class _Proxy:
    """The admin and spend API of a running proxy, over HTTP."""

    def __init__(self, url: str, admin_key: str | None) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--url")
        if admin_key is None:
            settings = _settings()
            admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        if not admin_key:
            raise click.UsageError("--url needs the admin key: --admin-key or "
                                   "FLUX_PROXY_ADMIN_KEY")
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=30.0,
                                    headers={"Authorization": f"Bearer {admin_key}"})
        click.echo(f"proxy: {self.url} (admin API)", err=True)

    def call(self, method: str, path: str, *, ok: int = 200, **kwargs: Any) -> Any:
        import httpx

        try:
            r = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach the proxy at {self.url}: "
                                       f"{exc or type(exc).__name__}") from None
        if r.status_code != ok:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200] or r.reason_phrase
            hint = " (check --admin-key / FLUX_PROXY_ADMIN_KEY)" if r.status_code in (401, 403) \
                else ""
            raise click.ClickException(f"{method} {self.url}{path}: {r.status_code} "
                                       f"{message}{hint}")
        return r.text if r.headers.get("content-type", "").startswith("text/") else r.json()
