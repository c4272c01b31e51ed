"""`flux-proxy serve`: one server process, or a supervisor of `workers` on one port.

One worker (the default) is the process itself, as it always was; it applies
the migrations in a short-lived forked child first (`migrate_in_child`), so
alembic is never held in the serving process's memory. With N > 1 the process
becomes a small supervisor (as gunicorn's arbiter):

1. it applies the migrations, once, before any worker starts;
2. it binds the listening socket itself and hands it to N worker processes
   (started fresh with multiprocessing's spawn; the kernel spreads connections
   among the processes accepting on it; a worker that dies loses nothing
   queued on the socket, unlike one SO_REUSEPORT socket per worker);
3. worker n is named ``<instance_id>/<n>`` in leases, so a restarted worker
   resumes its own unfinished predictions at once, and the others' are taken
   over by the lease sweepers as with replicas;
4. each worker sizes its own memory budgets and client read timeouts, exactly
   as one process does (so the host's peak is N times one worker's);
5. a worker that dies is restarted (0.1 s, then longer: x4 per death up to
   10 s); a worker that dies `MAX_DEATHS` times within `DEATH_WINDOW_S` (a crash
   loop, e.g. at start-up) stops the supervisor and all workers, exit status 1;
6. SIGTERM or SIGINT stops every worker gracefully (SIGTERM: in-flight
   predictions are handed back through their leases), killing those still
   running after `STOP_TIMEOUT_S`; a second signal kills them at once. Exit 0.
7. Prometheus samples go to a temporary PROMETHEUS_MULTIPROC_DIR it makes and
   removes (proxy/metrics.py); a dead worker's live gauges are dropped.

Workers watch the supervisor too: one that outlives it stops itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from proxy.config import Settings

DEATH_WINDOW_S = 60.0
MAX_DEATHS = 5  # of one worker within the window: a crash loop
STOP_TIMEOUT_S = 30.0
MAX_RESTART_DELAY_S = 10.0
BACKLOG = 2048


def serve(settings: Settings) -> int:
    """Serve until stopped; the exit status."""
    if settings.workers <= 1:
        run_server(settings)
        return 0
    return Supervisor(settings).run()


def run_server(settings: Settings, sock: socket.socket | None = None) -> None:
    """One server process: budgets, client timeouts, the app, uvicorn. Without
    `sock` it binds the address and migrates the database itself (in a forked
    child where it can: `migrate_in_child`)."""
    import uvicorn

    from common.media import budget
    from proxy.app import create_app
    from proxy.client_timeouts import protocol_class

    budget.configure(download_bytes=settings.max_inflight_download_bytes,
                     decode_bytes=settings.max_inflight_decode_bytes)
    migrate_here = sock is None
    if migrate_here:
        migrated = migrate_in_child(settings)
        if migrated is False:
            sys.exit(3)  # as uvicorn's "startup failed" when the app migrated itself
        migrate_here = migrated is None
    app = create_app(settings, migrate=migrate_here)
    http = protocol_class(header_timeout_s=settings.client_header_timeout_s,
                          body_timeout_s=settings.client_body_timeout_s)

    class _AnnouncingServer(uvicorn.Server):
        """uvicorn's server, logging `serve.listening` once its sockets are bound."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                log_listening([s for server in self.servers for s in server.sockets or ()],
                              workers=1)

    if sock is None:
        # ws="none": no route takes a WebSocket, and uvicorn then imports no
        # websockets implementation (bench/RESULTS-speed.md "Idle RSS").
        config = uvicorn.Config(app, host=settings.host, port=settings.port,
                                log_level="warning", access_log=False, proxy_headers=True,
                                server_header=False, http=http, ws="none")
        server: uvicorn.Server = _AnnouncingServer(config)
        with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
            server.run()
    else:  # a worker of the supervisor, which said where it listens
        config = uvicorn.Config(app, log_level="warning", access_log=False, proxy_headers=True,
                                server_header=False, http=http, ws="none")
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)  # uvicorn's "startup failed"


def log_listening(sockets: Iterable[Any], workers: int, **extra: object) -> None:
    """The start-up line, `serve.listening`: the address and port actually bound (the
    port the kernel chose for `--port 0`), the URL to call and the server processes."""
    from common.logging import get_logger

    bound = [s.getsockname() for s in sockets if s.family in (socket.AF_INET, socket.AF_INET6)]
    if not bound:
        return
    host, port = bound[0][0], bound[0][1]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    fields: dict[str, object] = {"host": host, "port": port, "url": url, "workers": workers}
    if len(bound) > 1:  # a name that resolved to several addresses (localhost: v4 and v6)
        fields["addresses"] = [f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"
                               for a in bound]
    get_logger("flux_proxy.serve").info("serve.listening", **fields, **extra)


def migrate_database(settings: Settings) -> bool:
    """Apply the migrations (`Store.upgrade`); False, logged as `serve.migrate_failed`,
    when the database cannot be reached or migrated."""
    from sqlalchemy.exc import SQLAlchemyError

    from common.logging import get_logger
    from proxy.store.repo import Store

    async def upgrade() -> None:
        store = Store(settings.database_url)
        try:
            await store.upgrade()
        finally:
            await store.dispose()

    try:
        asyncio.run(upgrade())
    except (OSError, SQLAlchemyError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        get_logger("flux_proxy.serve").error("serve.migrate_failed", error=reason)
        return False
    return True


def _migrate_child(settings: Settings) -> None:
    from common.logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    sys.exit(0 if migrate_database(settings) else 1)


def migrate_in_child(settings: Settings) -> bool | None:
    """Migrate in a forked child, so that alembic (about 9 MiB of modules, needed
    once) never lives in the serving process: whether it succeeded, or None where
    this process cannot fork safely (no fork, threads running, or an in-memory
    SQLite database, which only this process can see) and the app migrates itself.
    The child shares what this process has imported (copy on write), so it costs
    little more time than migrating here."""
    from sqlalchemy.engine import make_url

    from proxy.store.db import normalize_url

    url = make_url(normalize_url(settings.database_url))
    in_memory = url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or url.query.get("mode") == "memory")
    if (in_memory or "fork" not in multiprocessing.get_all_start_methods()
            or threading.active_count() > 1):
        return None
    child = multiprocessing.get_context("fork").Process(
        target=_migrate_child, args=(settings,), name="flux-proxy-migrate")
    child.start()
    child.join()
    return child.exitcode == 0


def worker_instance_id(settings: Settings, index: int, port: int | None = None) -> str:
    """`<instance_id>/<n>`; the instance id defaults to `<hostname>:<port>` (the port
    bound, when `port` is 0)."""
    base = settings.instance_id or f"{socket.gethostname()}:{port or settings.port}"
    return f"{base}/{index}"


def _worker_main(settings: Settings, sock: socket.socket, supervisor_pid: int,
                 index: int) -> None:
    """A worker process (spawned): serve on the supervisor's socket."""
    import structlog

    _stop_when_orphaned(supervisor_pid)
    structlog.contextvars.bind_contextvars(worker=index)
    run_server(settings, sock)


def _stop_when_orphaned(supervisor_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # graceful: leases are handed back

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket all workers accept on (bound as uvicorn binds one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class _Worker:
    index: int
    instance_id: str
    process: BaseProcess | None = None
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float | None = None


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        from common.logging import configure_logging, get_logger

        configure_logging(settings.log_level, settings.log_format)
        self.log = get_logger("flux_proxy.serve")
        self.settings = settings
        self.workers: list[_Worker] = []
        self._ctx = multiprocessing.get_context("spawn")
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._sock: socket.socket | None = None
        self._metrics_dir = ""

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        from proxy import metrics

        if not self._migrate():
            return 1
        try:
            self._sock = bind(self.settings.host, self.settings.port)
        except OSError as exc:
            self.log.error("serve.bind_failed", host=self.settings.host,
                           port=self.settings.port, error=str(exc))
            return 1
        self._metrics_dir = tempfile.mkdtemp(prefix="flux-proxy-metrics-")
        previous = os.environ.get(metrics.MULTIPROC_DIR_ENV)
        os.environ[metrics.MULTIPROC_DIR_ENV] = self._metrics_dir  # inherited by the workers
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            port = self._sock.getsockname()[1]
            self.workers = [_Worker(i, worker_instance_id(self.settings, i, port))
                            for i in range(self.settings.workers)]
            log_listening([self._sock], len(self.workers), metrics_dir=self._metrics_dir)
            for w in self.workers:
                self._start(w)
            status = self._watch()
            self._stop_all()
            return status
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if previous is None:
                os.environ.pop(metrics.MULTIPROC_DIR_ENV, None)
            else:
                os.environ[metrics.MULTIPROC_DIR_ENV] = previous
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._sock.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.log.info("serve.stopped")

    def _migrate(self) -> bool:
        """Migrations once, before any worker starts (they do not migrate): in a
        forked child where it can, so the supervisor never holds alembic either."""
        migrated = migrate_in_child(self.settings)
        return migrate_database(self.settings) if migrated is None else migrated

    def _on_signal(self, sig: int, _frame: FrameType | None) -> None:
        self._signals.append(sig)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _start(self, w: _Worker) -> None:
        settings = self.settings.model_copy(update={"instance_id": w.instance_id})
        process = self._ctx.Process(target=_worker_main, name=f"flux-proxy-worker-{w.index}",
                                    args=(settings, self._sock, os.getpid(), w.index))
        process.start()
        w.process, w.restart_at = process, None
        self.log.info("serve.worker_started", worker=w.index, pid=process.pid,
                      instance_id=w.instance_id)

    def _wait(self, timeout: float) -> None:
        sentinels = [w.process.sentinel for w in self.workers
                     if w.process is not None and w.process.is_alive()]
        ready = multiprocessing.connection.wait([self._wake_r, *sentinels], max(0.0, timeout))
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 512)

    def _watch(self) -> int:
        """Restart workers that die until a signal comes; 1 on a crash loop."""
        while not self._signals:
            now = time.monotonic()
            due = [w.restart_at for w in self.workers if w.restart_at is not None]
            self._wait(min([1.0, *(t - now for t in due)]))
            now = time.monotonic()
            for w in self.workers:
                if w.process is not None and not w.process.is_alive():
                    if self._signals:
                        break  # stopping: not a death to restart
                    if not self._buried(w, now):
                        return 1
                if w.restart_at is not None and w.restart_at <= now and not self._signals:
                    self._start(w)
        self.log.info("serve.stopping", signal=signal.Signals(self._signals[0]).name)
        return 0

    def _buried(self, w: _Worker, now: float) -> bool:
        """Record a worker's death and schedule its restart; False on a crash loop."""
        from prometheus_client import multiprocess

        assert w.process is not None
        pid, code = w.process.pid, w.process.exitcode
        w.process.close()
        w.process = None
        if pid is not None:
            multiprocess.mark_process_dead(pid, self._metrics_dir)
        w.deaths.append(now)
        while w.deaths and w.deaths[0] < now - DEATH_WINDOW_S:
            w.deaths.popleft()
        if len(w.deaths) >= MAX_DEATHS:
            self.log.error("serve.crash_loop", worker=w.index, pid=pid, exitcode=code,
                           deaths=len(w.deaths), window_s=DEATH_WINDOW_S,
                           message="stopping every worker")
            return False
        delay = min(MAX_RESTART_DELAY_S, 0.1 * 4 ** (len(w.deaths) - 1))
        w.restart_at = now + delay
        self.log.warning("serve.worker_died", worker=w.index, pid=pid, exitcode=code,
                         restart_in_s=delay)
        return True

    def _stop_all(self) -> None:
        """SIGTERM to every worker; SIGKILL to those left after the timeout (or at a
        second signal)."""
        alive = [w.process for w in self.workers if w.process is not None]
        for p in alive:
            if p.is_alive():
                p.terminate()
        signals = len(self._signals)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(p.is_alive() for p in alive):
            left = deadline - time.monotonic()
            if left <= 0 or len(self._signals) > max(1, signals):
                for p in alive:
                    if p.is_alive():
                        self.log.warning("serve.worker_killed", pid=p.pid)
                        p.kill()
                for p in alive:
                    p.join(5.0)
                break
            self._wait(min(left, 1.0))
        for w in self.workers:
            if w.process is not None:
                w.process.join(1.0)
                w.process = None
