"""The console script: serve's config errors, db upgrade, simulate."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

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

    assert cli("keys", "revoke", "app-a").returncode == 0
    assert cli("keys", "revoke", "app-a").returncode != 0

    table = cli("spend", "--group-by", "key")
    assert table.returncode == 0 and "TOTAL" in table.stdout
    as_csv = cli("spend", "--csv", "--from", "2026-01-01")
    assert as_csv.stdout.splitlines()[0].startswith("group,cost_usd,cost_micro_usd")
    assert cli("spend", "--from", "soon").returncode == 2
