"""`flux-proxy serve | db upgrade | keys ... | spend | worker | simulate ...`
(and a running proxy's client commands, `generate | predictions | models`, in cli_client.py)

`keys`, `spend` and `db` resolve settings exactly as `serve` does and say on
stderr which database they use; `keys` and `spend` never create one. With
`--url` (and the admin key) `keys` and `spend` use a running proxy's admin and
spend API over HTTP instead.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from proxy.cli_client import register as register_client_commands
from proxy.cli_support import (
    _auth,
    _Proxy,
    _remote_options,
    _run_async,
    _run_with_store,
    _settings,
    _which_database,
)

if TYPE_CHECKING:
    from proxy.accounts.spend_report import Report
    from proxy.config import Settings
    from proxy.store.repo import Store


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flux-proxy", prog_name="flux-proxy")  # importlib.metadata
def main() -> None:
    """flux-proxy: one endpoint for FLUX.1 [dev] across providers."""


register_client_commands(main)  # generate, predictions, models: proxy/cli_client.py


@main.command()
@click.option("--host", default=None, help="Bind address (default 127.0.0.1, FLUX_PROXY_HOST).")
@click.option("--port", type=int, default=None, help="Port (default 8080, FLUX_PROXY_PORT).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Server processes on the port, sharing the database (default 1, "
                   "FLUX_PROXY_WORKERS).")
@click.option("--log-level", default=None,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default=None, type=click.Choice(["auto", "json", "console"]),
              help="auto (the default, FLUX_PROXY_LOG_FORMAT): JSON lines unless stdout is "
                   "a terminal, where lines are pretty.")
def serve(host: str | None, port: int | None, workers: int | None,
          log_level: str | None, log_format: str | None) -> None:
    """Apply migrations and serve the proxy.

    Each process's memory budgets (max_inflight_download_bytes,
    max_inflight_decode_bytes) are sized before its app starts, and clients get
    the header and body read timeouts (proxy/client_timeouts.py). With --workers N
    a supervisor migrates once, then runs and restarts N workers (proxy/serve.py).
    Once listening it logs `serve.listening`: the address and port bound (--port 0:
    the one the kernel chose) and the URL."""
    from proxy.serve import serve as run

    settings = _settings(host=host, port=port, workers=workers, log_level=log_level,
                         log_format=log_format)
    if settings.redis_url is not None:
        from proxy.shared import parse_redis_url  # redis only when it is configured

        try:
            parse_redis_url(settings.redis_url.get_secret_value())
        except ValueError as exc:
            click.echo(f"configuration error: redis_url: {exc}", err=True)
            sys.exit(2)
    sys.exit(run(settings))


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply Alembic migrations to the configured database (creating a SQLite file)."""
    from proxy.store.repo import Store

    settings = _settings()
    _which_database(settings, create=True)

    async def run() -> None:
        store = Store(settings.database_url)
        try:
            await store.upgrade()
        finally:
            await store.dispose()

    _run_async(run())
    click.echo("database is at the latest revision")


def _print_keys(rows: list[dict[str, Any]]) -> None:
    cols = ("id", "name", "prefix", "budget_usd", "period", "rate_per_s", "revoked_at")
    table = [cols, *[tuple("" if r[c] is None else str(r[c]) for c in cols) for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _created(name: str, key_id: str, key: str, webhook_secret: str | None) -> None:
    click.echo(f"created {name} ({key_id})")
    click.echo(f"key: {key}")
    click.echo(f"webhook signing secret: {webhook_secret}")
    click.echo("store them now: they are not shown again", err=True)


@main.group()
def keys() -> None:
    """Client API keys (stored hashed; a key is shown once, at creation)."""


@keys.command("create")
@click.option("--name", required=True, help="Unique name, e.g. marketing-app.")
@click.option("--budget-usd", default=None, help="Budget per period, e.g. 50.")
@click.option("--period", type=click.Choice(["day", "month"]), default=None,
              help="Budget period (default month).")
@click.option("--rate", default=None, help="Request rate limit, e.g. 10/s or 600/m.")
@click.option("--burst", type=int, default=None, help="Requests allowed at once (default: rate).")
@click.option("--meta", multiple=True, help="key=value metadata (team, app); repeatable.")
@_remote_options
def keys_create(name: str, budget_usd: str | None, period: str | None, rate: str | None,
                burst: int | None, meta: tuple[str, ...], url: str | None,
                admin_key: str | None) -> None:
    """Create a key and print it (once)."""
    from pydantic import ValidationError

    from proxy.accounts.keyspec import KeySpec
    from proxy.store.keys import DuplicateKeyName

    bad = [m for m in meta if "=" not in m]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not key=value", param_hint="--meta")
    try:
        spec = KeySpec.model_validate({
            "name": name, "budget_usd": budget_usd, "period": period, "rate": rate,
            "burst": burst, "meta": dict(m.split("=", 1) for m in meta)})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors())
        raise click.UsageError(problems) from None

    if url is not None:
        made = _Proxy(url, admin_key).call(
            "POST", "/admin/keys", ok=201, json=spec.model_dump(mode="json", exclude_none=True))
        _created(made["name"], made["id"], made["key"], made.get("webhook_secret"))
        return

    async def create(store: Store, settings: Settings) -> None:
        auth = _auth(store, settings)
        try:
            key, row = await auth.create(spec.name, **spec.fields())
        except DuplicateKeyName as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"key hash secret: {auth.secret_source}", err=True)
        _created(row.name, row.id, key, row.webhook_secret)

    _run_with_store(create)


@keys.command("list")
@_remote_options
def keys_list(url: str | None, admin_key: str | None) -> None:
    """List keys (never their secrets)."""
    from proxy.accounts.keyspec import key_view

    if url is not None:
        _print_keys(_Proxy(url, admin_key).call("GET", "/admin/keys")["data"])
        return

    async def show(store: Store, settings: Settings) -> None:
        _print_keys([key_view(k) for k in await store.list_keys()])

    _run_with_store(show)


@keys.command("webhook-secret")
@click.argument("key")
@_remote_options
def keys_webhook_secret(key: str, url: str | None, admin_key: str | None) -> None:
    """Rotate a key's webhook signing secret (by id or name) and print the new one;
    the old one keeps signing for webhook_secret_grace_s."""
    from urllib.parse import quote

    if url is not None:
        row = _Proxy(url, admin_key).call("POST",
                                          f"/admin/keys/{quote(key, safe='')}/webhook-secret")
        _rotated(row["name"], row["webhook_secret"], row["webhook_previous_secret_until"])
        return

    async def rotate(store: Store, settings: Settings) -> None:
        row = await store.find_key(key)
        if row is None:
            raise click.ClickException(f"no key {key}")
        if row.revoked_at is not None:
            raise click.ClickException(f"key {row.name} is revoked")
        rotated = await _auth(store, settings).rotate_webhook_secret(
            row, settings.webhook_secret_grace_s)
        until = rotated.webhook_secret_prev_until
        _rotated(rotated.name, rotated.webhook_secret, until.isoformat() if until else None)

    _run_with_store(rotate)


def _rotated(name: str, secret: str | None, previous_until: str | None) -> None:
    click.echo(f"webhook signing secret of {name}: {secret}")
    if previous_until:
        click.echo(f"the previous secret also signs until {previous_until}", err=True)
    click.echo("store it now: it is not shown again", err=True)


@keys.command("revoke")
@click.argument("key")
@_remote_options
def keys_revoke(key: str, url: str | None, admin_key: str | None) -> None:
    """Revoke a key by id or name (effective at once here, within seconds elsewhere)."""
    from urllib.parse import quote

    if url is not None:
        row = _Proxy(url, admin_key).call("POST", f"/admin/keys/{quote(key, safe='')}/revoke")
        click.echo(f"revoked {row['name']} ({row['id']})")
        return

    async def revoke(store: Store, settings: Settings) -> None:
        row = await store.find_key(key)
        if row is None:
            raise click.ClickException(f"no key {key}")
        if not await store.revoke_key(row.id):
            raise click.ClickException(f"key {row.name} is already revoked")
        click.echo(f"revoked {row.name} ({row.id})")

    _run_with_store(revoke)


@main.command()
@click.option("--group-by", type=click.Choice(["key", "provider", "model", "day"]),
              default="provider", show_default=True)
@click.option("--from", "since", default=None, help="ISO date or datetime (inclusive, UTC).")
@click.option("--to", "until", default=None, help="ISO date or datetime (exclusive, UTC).")
@click.option("--key", default=None, help="Only this key (id or name; not with --url).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of a table.")
@_remote_options
def spend(group_by: str, since: str | None, until: str | None, key: str | None,
          as_csv: bool, url: str | None, admin_key: str | None) -> None:
    """Spend totals from the attempt records: cost, images, predictions, failed attempts."""
    from proxy.accounts.spend_report import build_report, parse_bound

    try:
        start, end = parse_bound(since, "--from"), parse_bound(until, "--to")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None

    if url is not None:
        if key is not None:  # GET /v1/spend has no key filter; the admin sees all keys
            raise click.UsageError("--key cannot be used with --url (try --group-by key)")
        params = {"group_by": group_by, "format": "csv" if as_csv else "json",
                  **{k: v for k, v in (("from", since), ("to", until)) if v}}
        answer = _Proxy(url, admin_key).call("GET", "/v1/spend", params=params)
        click.echo(answer if as_csv else _report_of(answer).to_table(), nl=not as_csv)
        return

    async def report(store: Store, settings: Settings) -> None:
        key_id = None
        if key is not None:
            row = await store.find_key(key)
            if row is None:
                raise click.ClickException(f"no key {key}")
            key_id = row.id
        rep = await build_report(store, group_by, since=start, until=end,  # type: ignore[arg-type]
                                 api_key_id=key_id)
        click.echo(rep.to_csv() if as_csv else rep.to_table(), nl=not as_csv)

    _run_with_store(report)


def _report_of(body: dict[str, Any]) -> Report:
    """The report /v1/spend answered as JSON, to print as `spend` prints its own."""
    from datetime import datetime

    from proxy.accounts.spend_report import Report
    from proxy.store.spend import SpendRow

    def row(d: dict[str, Any], group: str | None) -> SpendRow:
        return SpendRow(group, d["cost_micro_usd"], d["images"], d["predictions"],
                        d["attempts"], d["failed_attempts"])

    by_key = body["group_by"] == "key"
    rows = [row(d, d.get("key_id") if by_key else d["group"]) for d in body["data"]]
    names = {d["key_id"]: d["group"] for d in body["data"] if by_key and d.get("key_id")}
    bound = {k: datetime.fromisoformat(body[k]) if body.get(k) else None for k in ("from", "to")}
    return Report(body["group_by"], bound["from"], bound["to"], rows, row(body["total"], None),
                  names)


@main.command()
@click.option("--model", "model_path", default=None,
              help="Local FLUX.1 [dev] folder (diffusers layout, model_index.json).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default=None)
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default=None)
@click.option("--host", default=None, help="Bind address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 8090).")
@click.option("--max-batch-size", type=int, default=None, help="Images per pipeline call.")
@click.option("--safety-checker", type=click.Choice(["vit", "nudenet", "none"]), default=None)
@click.option("--safety-model", "safety_model_path", default=None,
              help="Folder of the NSFW ViT classifier (Falconsai/nsfw_image_detection layout).")
@click.option("--nsfw-policy", type=click.Choice(["flag", "blackout"]), default=None)
def worker(**options: Any) -> None:
    """Serve FLUX.1 [dev] on this machine's GPU (needs `pip install .[local]`)."""
    try:
        from worker.main import serve as serve_worker
        from worker.settings import WorkerConfigError, WorkerSettings
    except ImportError as exc:
        raise click.ClickException(
            f"the worker needs the ML extra: pip install '.[local]' ({exc})") from None
    from pydantic import ValidationError

    try:
        settings = WorkerSettings(**{k: v for k, v in options.items() if v is not None})
        settings.check()
    except (ValidationError, WorkerConfigError) as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)
    serve_worker(settings)


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
