"""The proxy as a child process: its TOML config, start, client keys, its database."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.harness.procs import HOST, Service, clean_env, cli, loopback
from bench.harness.simulators import SIM_KEY


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_dumps(table: Mapping[str, Any], _name: str = "") -> str:
    """``table`` as TOML: its plain keys, then each sub-table as a [section] (nested
    sections as [a.b]). Values: strings, numbers, booleans, lists of those."""
    plain = [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, Mapping)]
    out = []
    if plain:  # a table of tables only needs no header of its own
        header = [f"[{_name}]"] if _name else []
        out.append("\n".join([*header, *plain]))
    for key, sub in table.items():
        if isinstance(sub, Mapping):
            out.append(toml_dumps(sub, f"{_name}.{key}" if _name else key))
    return "\n\n".join(part.rstrip("\n") for part in out if part) + "\n"


def proxy_config(port: int, database_url: str, *, instance_id: str, order: Sequence[str],
                 providers: Mapping[str, Mapping[str, Any]], sync_timeout_s: float = 60.0,
                 routing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A proxy config on 127.0.0.1:``port``, logging warnings only, routing in ``order``;
    ``providers``: name -> settings (each gets the simulators' API key)."""
    return {
        "host": HOST, "port": port, "database_url": database_url, "log_level": "warning",
        "instance_id": instance_id, "sync_timeout_s": sync_timeout_s,
        "routing": {"order": list(order), **(routing or {})},
        "providers": {name: {"api_key": SIM_KEY, **settings} if settings.get("enabled", True)
                      else dict(settings) for name, settings in providers.items()},
    }


def start_proxy(workdir: Path, tag: str, config: Mapping[str, Any], *,
                env: Mapping[str, str] | None = None, ready_path: str = "/healthz"
                ) -> tuple[Service, dict[str, str]]:
    """`flux-proxy serve` with ``config`` written to ``workdir/proxy-<tag>.toml`` (log:
    ``proxy-<tag>.log``), once ``ready_path`` answers; and its environment (``env`` on
    top of a clean one), for `flux-proxy` commands against the same database."""
    path = workdir / f"proxy-{tag}.toml"
    path.write_text(toml_dumps(config))
    full_env = clean_env() | dict(env or {}) | {"FLUX_PROXY_CONFIG": str(path)}
    proxy = Service(f"proxy[{tag}]", [*cli(), "serve"], workdir / f"proxy-{tag}.log",
                    env=full_env)
    try:
        proxy.wait_ready(f"http://{HOST}:{config['port']}{ready_path}")
    except BaseException:
        proxy.stop()
        raise
    return proxy, full_env


def cli_client_key(env: Mapping[str, str], name: str) -> str | None:
    """`flux-proxy keys create` against the proxy's database (``env``: the proxy's): a
    client key, so requests pay for authentication as real ones do. None when this
    version has no `keys` command (it has no client authentication either)."""
    probe = subprocess.run([*cli(), "keys", "--help"], env=dict(env), capture_output=True,
                           text=True, timeout=60, check=False)
    if probe.returncode != 0:
        return None
    done = subprocess.run([*cli(), "keys", "create", "--name", name], env=dict(env),
                          capture_output=True, text=True, timeout=60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("key: "):
            return line.removeprefix("key: ").strip()
    raise RuntimeError(f"`flux-proxy keys create` failed ({done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()[-500:]}")


def admin_client_key(url: str, admin_key: str, name: str) -> str | None:
    """A client key made through ``POST /admin/keys`` with the admin key (None where the
    proxy has no /admin/keys, i.e. predates client keys)."""
    r = httpx.post(loopback(url) + "/admin/keys", json={"name": name}, timeout=10,
                   headers={"Authorization": f"Bearer {admin_key}"}, trust_env=False)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    key: str = r.json()["key"]
    return key


def bearer(key: str | None) -> dict[str, str]:
    """Authorization headers for ``key`` (none for None)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def add_postgres_args(ap: argparse.ArgumentParser, default_url: str) -> None:
    """`--pg-url` and `--pg-force`, as every benchmark with `--db postgres` takes them."""
    ap.add_argument("--pg-url", default=default_url,
                    help="PostgreSQL for --db postgres; its tables are dropped first")
    ap.add_argument("--pg-force", action="store_true",
                    help="allow a --pg-url database not named flux_bench*")


async def reset_postgres(url: str, *, force: bool = False) -> None:
    """Create the benchmark database if missing and empty its `public` schema (every
    table any proxy version made there), so migrations start from nothing.

    Only a database whose name starts with `flux_bench` is touched (unless `force`),
    so a typo cannot wipe the test database.
    """
    import asyncpg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = parsed.database or ""
    if not name.startswith("flux_bench") and not force:
        raise SystemExit(f"refusing to reset PostgreSQL database {name!r}: "
                         "use a database named flux_bench* (or --pg-force)")
    kw: dict[str, Any] = {"host": parsed.host or HOST, "port": parsed.port or 5432,
                          "user": parsed.username or "postgres", "password": parsed.password}
    admin = await asyncpg.connect(database="postgres", timeout=10, **kw)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(database=name, timeout=10, **kw)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
