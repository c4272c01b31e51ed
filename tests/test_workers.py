"""`flux-proxy serve --workers N`: N real processes on one port, one database.

Each test starts the supervisor as a subprocess against a simulator on loopback
(tests/_serve.py), on SQLite or a PostgreSQL database of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from providers.simulators import SimulatorServer

from ._serve import (
    alive,
    pg_database,
    query,
    serve_process,
    sqlite_url,
    stop,
    write_config,
)
from .conftest import metric_value

BODY = {"prompt": "a lighthouse", "size": "512*512"}


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield sqlite_url(tmp_path)
        return
    with pg_database() as url:
        yield url


def submit(base: str, n: int) -> list[str]:
    """`n` predictions from 8 threads, each request on a new connection (so the
    kernel spreads them over the workers)."""
    def one(_: int) -> str:
        r = httpx.post(f"{base}/v1/predictions", json=BODY, timeout=30)
        assert r.status_code == 202, r.text
        pred_id: str = r.json()["id"]
        return pred_id

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def wait_all(base: str, ids: list[str], timeout_s: float = 60) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(ids):
        for pred_id in ids:
            if pred_id in done:
                continue
            body = httpx.get(f"{base}/v1/predictions/{pred_id}", timeout=10).json()
            if body["status"] in ("completed", "failed", "canceled"):
                done[pred_id] = body
        assert time.monotonic() < deadline, f"{len(ids) - len(done)} never finished"
        time.sleep(0.1)
    return done


def owners(database_url: str) -> dict[str, str]:
    """prediction id -> the worker holding its lease (unfinished ones)."""
    return {pid: owner for pid, owner in query(
        database_url, "SELECT id, lease_owner FROM predictions WHERE lease_owner IS NOT NULL")}


def wait_upstream(database_url: str, ids: list[str], timeout_s: float = 30) -> None:
    """Until every prediction's attempt has its upstream id (the job runs upstream)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = query(database_url, "SELECT prediction_id FROM attempts "
                                   "WHERE upstream_id IS NOT NULL")
        if {r[0] for r in rows} >= set(ids):
            return
        assert time.monotonic() < deadline, "jobs never reached the upstream"
        time.sleep(0.1)


def check_each_once(database_url: str, ids: list[str]) -> None:
    """Every prediction is one row with one attempt, and that attempt completed."""
    preds = query(database_url, "SELECT id, status FROM predictions")
    assert sorted(p for p, _ in preds) == sorted(ids)
    assert {s for _, s in preds} == {"completed"}
    attempts = query(database_url, "SELECT prediction_id, status, cost_micro_usd FROM attempts")
    assert sorted(a[0] for a in attempts) == sorted(ids), "a prediction was submitted twice"
    assert {(a[1], a[2]) for a in attempts} == {("completed", 20_000)}


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_workers_share_one_database_and_their_metrics(
    tmp_path: Path, vibedream_sim: SimulatorServer, db: str
) -> None:
    vibedream_sim.config.job_latency_s = 3.0
    n = 24
    with database(db, tmp_path) as url:
        config = tmp_path / "proxy.toml"
        write_config(config, vibedream_sim, url)
        with serve_process(config, tmp_path, workers=2) as served:
            ids = submit(served.base, n)
            # While they run, both workers hold some of them.
            held = set(owners(url).values())
            assert held == {f"{served.instance_id}/0", f"{served.instance_id}/1"}, held
            done = wait_all(served.base, ids)
            assert {b["status"] for b in done.values()} == {"completed"}
            # Whichever worker answers, /metrics counts every worker's predictions.
            for _ in range(4):
                page = httpx.get(f"{served.base}/metrics", timeout=10).text
                assert metric_value(page, "flux_proxy_predictions_accepted_total",
                                    model="flux-dev", surface="native") == n
                assert metric_value(page, "flux_proxy_predictions_total", model="flux-dev",
                                    provider="vibedream", status="completed",
                                    surface="native") == n
                assert metric_value(page, "flux_proxy_queue_wait_seconds_count",
                                    model="flux-dev") == n
                assert metric_value(page, "flux_proxy_predictions_in_flight") == 0
                assert metric_value(page, "flux_proxy_attempts_total", provider="vibedream",
                                    outcome="completed") == n
            pids = list(served.worker_pids().values())
            metrics_dir = served.events("serve.listening")[0]["metrics_dir"]
            assert os.listdir(metrics_dir)
            # SIGTERM stops every worker cleanly, and the metrics folder goes.
            assert stop(served) == 0
            assert not any(alive(pid) for pid in pids)
            assert not os.path.exists(metrics_dir)
            assert len(served.events("proxy.stopped")) == 2
        check_each_once(url, ids)
    assert vibedream_sim.stats["submits"] == n


@pytest.mark.postgres
def test_a_killed_worker_is_restarted_and_nothing_is_lost_or_paid_twice(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    vibedream_sim.config.job_latency_s = 5.0
    n = 16
    with pg_database() as url:
        config = tmp_path / "proxy.toml"
        write_config(config, vibedream_sim, url)
        with serve_process(config, tmp_path, workers=2) as served:
            ids = submit(served.base, n)
            wait_upstream(url, ids)
            victim = f"{served.instance_id}/0"
            theirs = [p for p, owner in owners(url).items() if owner == victim]
            assert theirs, "worker 0 drove none of them"
            killed = served.worker_pids()[0]
            os.kill(killed, signal.SIGKILL)
            done = wait_all(served.base, ids)
            assert {b["status"] for b in done.values()} == {"completed"}, done
            # The supervisor saw it die and started worker 0 again, which resumed its own.
            died = served.events("serve.worker_died")
            assert [(e["worker"], e["pid"], e["exitcode"]) for e in died] == [
                (0, killed, -signal.SIGKILL)]
            assert served.worker_pids()[0] != killed
            assert sum(e["count"] for e in served.events("predictions.resumed")) >= len(theirs)
            for pred_id in theirs:
                assert [a["status"] for a in done[pred_id]["attempts"]] == ["completed"]
            # The dead worker's counts are still in the totals.
            page = httpx.get(f"{served.base}/metrics", timeout=10).text
            assert metric_value(page, "flux_proxy_predictions_accepted_total",
                                model="flux-dev", surface="native") == n
            assert metric_value(page, "flux_proxy_predictions_total", model="flux-dev",
                                provider="vibedream", status="completed", surface="native") == n
        check_each_once(url, ids)
    # Polled again after the kill, never submitted again: paid once each.
    assert vibedream_sim.stats["submits"] == n


def test_without_a_database_the_supervisor_exits_non_zero_before_starting_workers(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    config = tmp_path / "proxy.toml"
    write_config(config, vibedream_sim, "postgresql+asyncpg://nobody@127.0.0.1:1/none")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_PROXY_")}
    env["FLUX_PROXY_CONFIG"] = str(config)
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--workers", "2",
                           "--port", "0"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 1
    assert b"serve.migrate_failed" in proc.stdout
    assert b"serve.worker_started" not in proc.stdout


def test_workers_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.config import Settings
    from proxy.serve import worker_instance_id

    monkeypatch.setenv("FLUX_PROXY_WORKERS", "3")
    monkeypatch.setenv("FLUX_PROXY_REDIS_URL", "redis://127.0.0.1:6379/0?key_prefix=x:")
    settings = Settings(instance_id="node-a")
    assert settings.workers == 3
    assert settings.redis_url is not None and "key_prefix" in settings.redis_url.get_secret_value()
    assert [worker_instance_id(settings, i) for i in range(3)] == [
        "node-a/0", "node-a/1", "node-a/2"]
    assert Settings().workers == 3 and Settings(workers=1).workers == 1


def test_each_worker_sizes_its_budgets_and_client_timeouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `serve` does for its one process, a worker does for itself, on the
    supervisor's socket and without migrating (the supervisor did)."""
    import socket

    import uvicorn

    from common.media import budget
    from proxy import app as app_module
    from proxy.client_timeouts import ClientTimeoutProtocol
    from proxy.config import Settings
    from proxy.serve import run_server

    seen: dict[str, Any] = {}

    class FakeServer:
        def __init__(self, config: uvicorn.Config) -> None:
            seen["config"] = config
            self.started = True

        def run(self, sockets: list[socket.socket]) -> None:
            seen["sockets"] = sockets

    def fake_create_app(settings: Settings, *, migrate: bool = True) -> str:
        seen["migrate"] = migrate
        return "app"

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.setattr(app_module, "create_app", fake_create_app)
    mib = 1024 * 1024
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", workers=2,
                        max_inflight_download_bytes=96 * mib,
                        max_inflight_decode_bytes=200 * mib,
                        client_header_timeout_s=7, client_body_timeout_s=9)
    before = (budget.downloads().capacity, budget.decoding().capacity)
    with socket.socket() as sock:
        try:
            run_server(settings, sock)
            assert (budget.downloads().capacity, budget.decoding().capacity) == (
                96 * mib, 200 * mib)
        finally:
            budget.configure(download_bytes=before[0], decode_bytes=before[1])
        assert seen["sockets"] == [sock] and seen["migrate"] is False
    http = seen["config"].http
    assert issubclass(http, ClientTimeoutProtocol)
    assert (http.header_timeout_s, http.body_timeout_s) == (7.0, 9.0)


def test_a_crash_loop_stops_the_supervisor_with_status_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy import serve
    from proxy.config import Settings

    from ._serve import crash_at_start, free_port

    monkeypatch.setattr(serve, "_worker_main", crash_at_start)  # spawned by reference
    monkeypatch.setattr(serve, "MAX_DEATHS", 3)
    settings = Settings(database_url=sqlite_url(tmp_path), workers=2, port=free_port(),
                        instance_id="loop", log_level="warning")
    supervisor = serve.Supervisor(settings)

    def never_gave_up(*_: object) -> None:
        raise TimeoutError("the supervisor kept restarting a crashing worker")

    previous = signal.signal(signal.SIGALRM, never_gave_up)
    signal.alarm(30)
    try:
        assert supervisor.run() == 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert all(w.process is None or not w.process.is_alive() for w in supervisor.workers)
    assert not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
