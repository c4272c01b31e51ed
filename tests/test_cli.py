"""The console script: serve's config errors, db upgrade, keys and spend (on the
database serve uses, or over a running proxy's admin API), simulate."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from litestar.testing import TestClient
from pydantic import SecretStr

from proxy.app import create_app
from proxy.cli import main
from proxy.config import Settings
from tests._serve import serving

CLI = [sys.executable, "-m", "proxy.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_"))}
    env.update(extra)
    return env


def test_help_lists_the_commands() -> None:
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "db", "simulate"):
        assert command in out
    serve = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True,
                           check=True).stdout
    assert "--host" in serve and "--port" in serve


def test_db_upgrade_creates_the_tables(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    env = _env(FLUX_PROXY_DATABASE_URL=f"sqlite:///{db}")
    r = subprocess.run([*CLI, "db", "upgrade"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("select name from sqlite_master")}
    assert {"predictions", "attempts", "alembic_version"} <= tables
    again = subprocess.run([*CLI, "db", "upgrade"], env=env, capture_output=True, timeout=60)
    assert again.returncode == 0  # idempotent


def test_serve_refuses_a_bad_config_clearly(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[routing]\norder = ["nope"]\n')
    r = subprocess.run([*CLI, "serve"], env=_env(FLUX_PROXY_CONFIG=str(cfg)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "configuration error" in r.stderr and "unknown providers" in r.stderr


def test_simulate_serves_the_wavespeed_wire_format() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*CLI, "simulate", "wavespeed", "--port", str(port),
                             "--api-key", "k"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.post(f"{base}/api/v3/wavespeed-ai/flux-dev", timeout=1,
                               headers={"Authorization": "Bearer k"},
                               json={"prompt": "p", "size": "256*256"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.1)
        assert r.status_code == 200
        body = r.json()
        assert body["code"] == 200 and body["data"]["status"] == "created"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_keys_create_list_revoke_and_spend(tmp_path: Path) -> None:
    env = _env(FLUX_PROXY_DATABASE_URL=f"sqlite:///{tmp_path / 'keys.db'}")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                              timeout=60)

    assert cli("db", "upgrade").returncode == 0  # keys and spend never create a database
    made = cli("keys", "create", "--name", "app-a", "--budget-usd", "50", "--period", "month",
               "--rate", "10/s", "--meta", "team=growth")
    assert made.returncode == 0, made.stderr
    key = next(line.split()[1] for line in made.stdout.splitlines() if line.startswith("key:"))
    assert key.startswith("fpk_")
    assert cli("keys", "create", "--name", "app-a").returncode != 0  # names are unique
    bad = cli("keys", "create", "--name", "b", "--rate", "lots")
    assert bad.returncode == 2 and "rate" in bad.stderr

    listed = cli("keys", "list")
    assert "app-a" in listed.stdout and "50.000000" in listed.stdout
    assert key not in listed.stdout  # shown once, at creation only
    with sqlite3.connect(tmp_path / "keys.db") as conn:
        [(stored,)] = conn.execute("select key_hash from api_keys").fetchall()
    assert key not in stored and len(stored) == 64

    # The webhook signing secret: shown at creation, rotated on demand, never listed.
    secret = next(line.split()[-1] for line in made.stdout.splitlines()
                  if line.startswith("webhook signing secret:"))
    rotated = cli("keys", "webhook-secret", "app-a")
    assert rotated.returncode == 0, rotated.stderr
    new_secret = rotated.stdout.split()[-1]
    assert secret.startswith("whsec_") and new_secret.startswith("whsec_")
    assert new_secret != secret and "previous secret also signs" in rotated.stderr
    assert secret not in cli("keys", "list").stdout and new_secret not in listed.stdout
    assert cli("keys", "webhook-secret", "nobody").returncode != 0

    assert cli("keys", "revoke", "app-a").returncode == 0
    assert cli("keys", "revoke", "app-a").returncode != 0
    assert cli("keys", "webhook-secret", "app-a").returncode != 0  # revoked

    table = cli("spend", "--group-by", "key")
    assert table.returncode == 0 and "TOTAL" in table.stdout
    as_csv = cli("spend", "--csv", "--from", "2026-01-01")
    assert as_csv.stdout.splitlines()[0].startswith("group,cost_usd,cost_micro_usd")
    assert cli("spend", "--from", "soon").returncode == 2


def _key_of(out: str) -> str:
    return next(line.split()[1] for line in out.splitlines() if line.startswith("key:"))


def test_serve_refuses_an_unknown_variable_naming_it(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "serve"], env=_env(FLUX_PROXY_PROT="9000"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == ("configuration error: unknown setting FLUX_PROXY_PROT in the "
                                "environment; did you mean FLUX_PROXY_PORT?")
    # the other commands resolve settings the same way
    keys = subprocess.run([*CLI, "keys", "list"], env=_env(FLUX_PROXY_PROT="9000"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert keys.returncode == 2 and "FLUX_PROXY_PROT" in keys.stderr


def invoke(*args: str) -> Result:
    """The console script in this process (environment and folder: the test's)."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_keys_and_spend_never_create_a_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for args in (["keys", "create", "--name", "a"], ["keys", "list"], ["spend"]):
        r = invoke(*args)
        assert r.exit_code == 1, r.output
        assert f"no database at {tmp_path / 'flux-proxy.db'}" in r.stderr
        assert "FLUX_PROXY_DATABASE_URL" in r.stderr and "--url" in r.stderr
        assert "key:" not in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_cli_uses_the_database_serve_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same FLUX_PROXY_CONFIG file, read from another folder: the key it prints works."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    db = home / "proxy.db"
    cfg = home / "flux.toml"
    cfg.write_text(f'database_url = "sqlite+aiosqlite:///{db}"\ninstance_id = "t"\n')
    monkeypatch.setenv("FLUX_PROXY_CONFIG", str(cfg))
    monkeypatch.chdir(elsewhere)

    up = invoke("db", "upgrade")
    assert up.exit_code == 0, up.output
    assert f"database: sqlite+aiosqlite:///{db} (from {cfg})" in up.stderr
    made = invoke("keys", "create", "--name", "app-a")
    assert made.exit_code == 0, made.output
    assert f"database: sqlite+aiosqlite:///{db} (from {cfg})" in made.stderr
    key = _key_of(made.stdout)
    assert list(elsewhere.iterdir()) == []

    with TestClient(create_app(Settings())) as client:  # Settings() as `serve` reads them
        ok = client.get("/v1/predictions", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text
        bad = client.get("/v1/predictions", headers={"Authorization": "Bearer fpk_nope"})
        assert bad.status_code == 401


def test_the_database_url_is_printed_with_the_password_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUX_PROXY_DATABASE_URL", "postgresql://flux:hunter2@127.0.0.1:1/flux")
    r = invoke("keys", "list")
    assert r.exit_code == 1  # nothing listens on port 1
    assert ("database: postgresql+asyncpg://flux:***@127.0.0.1:1/flux "
            "(from FLUX_PROXY_DATABASE_URL)") in r.stderr
    assert "database error" in r.stderr and "hunter2" not in r.output


def test_keys_and_spend_over_the_admin_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = "adm-41c2"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'proxy.db'}",
                        admin_key=SecretStr(admin), instance_id="t")
    client = tmp_path / "client"  # no database here, none configured: only the API is used
    client.mkdir()
    monkeypatch.chdir(client)
    with serving(settings) as url:
        monkeypatch.setenv("FLUX_PROXY_ADMIN_KEY", admin)
        made = invoke("keys", "create", "--name", "app-a", "--budget-usd", "50",
                      "--rate", "10/s", "--meta", "team=growth", "--url", url)
        assert made.exit_code == 0, made.output
        assert made.stdout.startswith("created app-a (key_")
        assert f"proxy: {url} (admin API)" in made.stderr and "database:" not in made.stderr
        key = _key_of(made.stdout)
        assert httpx.get(f"{url}/v1/predictions",
                         headers={"Authorization": f"Bearer {key}"}).status_code == 200

        again = invoke("keys", "create", "--name", "app-a", "--url", url)
        assert again.exit_code == 1 and "409" in again.stderr and "app-a" in again.stderr

        table = invoke("spend", "--group-by", "key", "--url", url)
        assert table.exit_code == 0, table.output
        assert table.stdout.splitlines()[0].split()[:2] == ["group", "cost_usd"]
        assert table.stdout.splitlines()[-1].split()[:2] == ["TOTAL", "0.000000"]
        as_csv = invoke("spend", "--csv", "--from", "2026-01-01", "--url", url)
        assert as_csv.stdout.splitlines()[0].startswith("group,cost_usd,cost_micro_usd")
        by_key = invoke("spend", "--key", "app-a", "--url", url)
        assert by_key.exit_code == 2 and "--key" in by_key.stderr

        assert "webhook signing secret: whsec_" in made.stdout
        rotated = invoke("keys", "webhook-secret", "app-a", "--url", url)
        assert rotated.exit_code == 0, rotated.output
        assert rotated.stdout.startswith("webhook signing secret of app-a: whsec_")

        revoked = invoke("keys", "revoke", "app-a", "--url", url)
        assert revoked.exit_code == 0 and revoked.stdout.startswith("revoked app-a (key_")
        assert httpx.get(f"{url}/v1/predictions",
                         headers={"Authorization": f"Bearer {key}"}).status_code == 401
        twice = invoke("keys", "revoke", "app-a", "--url", url)
        assert twice.exit_code == 1 and "already revoked" in twice.stderr

        monkeypatch.delenv("FLUX_PROXY_ADMIN_KEY")
        listed = invoke("keys", "list", "--url", url, "--admin-key", admin)
        assert listed.exit_code == 0, listed.output
        header, row = listed.stdout.splitlines()
        assert header.split() == ["id", "name", "prefix", "budget_usd", "period", "rate_per_s",
                                  "revoked_at"]
        assert row.split()[1:6] == ["app-a", key[:12], "50.000000", "month", "10.0"]
        assert key not in listed.stdout

        wrong = invoke("keys", "list", "--url", url, "--admin-key", "not-it")
        assert wrong.exit_code == 1 and "403" in wrong.stderr and "--admin-key" in wrong.stderr
        missing = invoke("keys", "list", "--url", url)
        assert missing.exit_code == 2 and "admin key" in missing.stderr
    assert list(client.iterdir()) == []
    down = invoke("keys", "list", "--url", url, "--admin-key", admin)
    assert down.exit_code == 1 and "cannot reach the proxy" in down.stderr
