"""Real `flux-proxy serve --workers N` processes for tests, and their databases.

`serving` runs the app under a real uvicorn in a thread (for clients that need a
socket: the official SDKs, the CLI's --url). `serve_process` starts the supervisor
on a free loopback port with a config file pointing at a simulator, waits until
every worker has started, and stops it with
SIGTERM (asserting a clean exit) at the end. `pg_database` makes a PostgreSQL
database of its own for one test and drops it after.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from providers.simulators import SimulatorServer

if TYPE_CHECKING:
    from proxy.config import Settings

PG_URL = os.environ.get("FLUX_PROXY_TEST_PG_URL",
                        "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN = "workers-admin-key"


class RecordingTransport(httpx.AsyncHTTPTransport):
    """A provider's transport that keeps every submit (POST) body the proxy sent."""

    def __init__(self) -> None:
        super().__init__()
        self.submits: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.submits.append(json.loads(await request.aread()))
        return await super().handle_async_request(request)


@contextmanager
def serving(settings: Settings,
            transports: dict[str, httpx.AsyncBaseTransport] | None = None) -> Iterator[str]:
    """The proxy app under a real uvicorn, on a loopback port of its own: its base URL.
    `transports`: per provider name, the transport its adapter uses (create_app's)."""
    from proxy.app import create_app

    with serving_app(create_app(settings, transports=transports), "proxy") as url:
        yield url


@contextmanager
def serving_app(app: Any, name: str = "app") -> Iterator[str]:
    """Any ASGI app under a real uvicorn in a thread, on a free loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def create_key(base_url: str, admin_key: str, name: str, **spec: Any) -> str:
    """A new client key through a running proxy's POST /admin/keys: the key."""
    r = httpx.post(f"{base_url}/admin/keys", json={"name": name, **spec},
                   headers={"Authorization": f"Bearer {admin_key}"}, timeout=10)
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(path: Path, sim: SimulatorServer, database_url: str, *,
                 lease_s: float = 30.0, auth: bool = False, log_level: str = "info") -> None:
    """A proxy config routing to the VibeDream simulator `sim`, polling it fast."""
    host = urlsplit(sim.base_url).netloc
    path.write_text(f"""
database_url = "{database_url}"
lease_s = {lease_s}
log_level = "{log_level}"
auth_enabled = {str(auth).lower()}

[routing]
order = ["vibedream"]

[providers.vibedream]
base_url = "{sim.base_url}"
api_key = "sim-key"
asset_hosts = ["{host}"]
allow_private_asset_hosts = true
poll_initial_s = 0.05
poll_max_s = 0.2
""")


@dataclass
class Served:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path
    instance_id: str
    env: dict[str, str] = field(default_factory=dict)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The supervisor's and workers' log lines (JSON on stdout) for `name`."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if f'"{name}"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                out.append(event)
        return out

    def worker_pids(self) -> dict[int, int]:
        """worker index -> pid of its latest process."""
        return {e["worker"]: e["pid"] for e in self.events("serve.worker_started")}


def _wait_started(served: Served, workers: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if served.proc.poll() is not None:
            raise AssertionError(f"serve exited {served.proc.returncode}:\n"
                                 f"{served.log.read_text()[-4000:]}")
        started = {e.get("worker") for e in served.events("proxy.started")}
        if len(started) >= workers:
            try:
                if httpx.get(f"{served.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        assert time.monotonic() < deadline, "serve did not start:\n" + \
            served.log.read_text()[-4000:]
        time.sleep(0.1)


@contextmanager
def serve_process(config: Path, tmp_path: Path, *, workers: int = 2,
                  extra_env: dict[str, str] | None = None) -> Iterator[Served]:
    port = free_port()
    instance_id = f"node-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_", "LOCAL_WORKER",
                                "PROMETHEUS_MULTIPROC"))}
    env.update(FLUX_PROXY_CONFIG=str(config), FLUX_PROXY_INSTANCE_ID=instance_id,
               **(extra_env or {}))
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port),
             "--workers", str(workers)],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    served = Served(f"http://127.0.0.1:{port}", proc, log, instance_id, env)
    try:
        _wait_started(served, workers, 90)
        yield served
    finally:
        stop(served)


def stop(served: Served, timeout_s: float = 40) -> int:
    """SIGTERM the supervisor; its exit status (killed, and a failure, past the timeout)."""
    proc = served.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError("serve did not stop on SIGTERM") from None
    return proc.returncode


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- PostgreSQL


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(PG_URL), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database (its SQLAlchemy URL), dropped afterwards."""
    if os.environ.get("FLUX_PROXY_SKIP_PG") == "1":
        pytest.skip("FLUX_PROXY_SKIP_PG=1: no PostgreSQL on this machine")
    name = f"flux_workers_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    base = urlsplit(PG_URL)
    try:
        yield base._replace(path=f"/{name}").geturl()
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'proxy.db'}"


def query(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of `sql` on the proxy's database (a plain read, outside the proxy)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> list[tuple[Any, ...]]:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                return [tuple(r) for r in (await conn.execute(text(sql))).all()]
        finally:
            await engine.dispose()

    return asyncio.run(run())


# --------------------------------------------------------------------------- Redis


@contextmanager
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the test Redis; its keys are deleted after."""
    import redis

    prefix = f"flux-test-{uuid.uuid4().hex[:10]}:"
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


def crash_at_start(*_args: object) -> None:
    """A worker that dies as it starts (the supervisor's crash-loop test spawns it)."""
    os._exit(3)
