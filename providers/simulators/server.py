"""Running a simulator: in a background thread for tests (`SimulatorServer`), or in the
foreground for the CLI (`serve`)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from .app import Kind, SimulatorApp, create_app
from .config import SimConfig

DEFAULT_PORTS: dict[str, int] = {"vibedream": 8701, "wavespeed": 8702}


def _quiet_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with the access log off.

    uvicorn decides per connection from the *global* `uvicorn.access` logger, and its
    `access_log=False` works by stripping that logger's handlers process-wide, which
    would silence the proxy's own access log in a shared process. Switching it off on
    our protocol instances instead touches nothing global (and saves a log record per
    request in benchmarks).
    """
    base: type[Any]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools is optional in uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class QuietProtocol(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.access_log = False

    return QuietProtocol


def _uvicorn_config(app: SimulatorApp, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "interface": "asgi3",
        "lifespan": "off",
        "http": _quiet_protocol(),
        "access_log": True,  # False would strip the global uvicorn.access logger
        "proxy_headers": False,
        "server_header": False,
        "date_header": False,
        "timeout_graceful_shutdown": 1,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


class SimulatorServer:
    """A simulator on 127.0.0.1, on a port the OS picks, in a background thread.

    Use as `with SimulatorServer("wavespeed") as sim:` (or `async with`); then
    `sim.base_url`, `sim.config` (live: assign fields to change knobs), `sim.stats`,
    `sim.billing` (every accepted task and its charge) and `sim.reset()`. Stopping is
    bounded (a few seconds at worst): held requests (hangs, sync waits) are released
    first.
    """

    def __init__(
        self,
        kind: Kind,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.kind = kind
        self.host = host
        self.app = create_app(kind, config)
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the simulator is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def config(self) -> SimConfig:
        return self.app.config

    @property
    def stats(self) -> dict[str, int]:
        return self.app.stats.as_dict()

    @property
    def billing(self) -> dict[str, Any]:
        """The billing log, as `GET /_sim/billing` serves it (see `billing.py`)."""
        return self.app.billing.as_dict(self.app.wire, time.monotonic())

    def reset(self, *, keep_config: bool = False) -> None:
        """Forget jobs and counters; restore the creation config unless `keep_config`."""
        self.app.reset(keep_config=keep_config)

    # ------------------------------------------------------------------ lifecycle

    def start(self, port: int = 0) -> SimulatorServer:
        """Serve on `port` (0: one the OS picks). Started again after `stop()` on its
        old port, it is an outage of the API with the jobs and billing kept, as a
        provider's front end restarting."""
        if self._thread is not None:
            raise RuntimeError("already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        self.port = sock.getsockname()[1]
        self.app.public_base_url = self.base_url
        # log_config=None: leave the host process's logging alone.
        server = uvicorn.Server(_uvicorn_config(self.app, log_config=None, log_level=None))
        self._server = server
        self._thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"simulator-{self.kind}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError(f"the {self.kind} simulator did not start")
            time.sleep(0.005)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self.app.close()
        server.should_exit = True
        thread.join(timeout_s / 2)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout_s / 2)
        self._server = self._thread = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> SimulatorServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


def serve(
    kind: Kind,
    host: str = "127.0.0.1",
    port: int | None = None,
    config: SimConfig | None = None,
    *,
    public_base_url: str | None = None,
    log_level: str = "info",
) -> None:
    """Run a simulator in the foreground until interrupted (the CLI's `simulate`).

    `port` None: 8701 for vibedream, 8702 for wavespeed. `public_base_url` None: URLs
    in answers (statusUrl, urls.get, images) follow each request's Host header, which
    is right behind docker-compose service names too.
    """
    port = DEFAULT_PORTS[kind] if port is None else port
    app = create_app(kind, config, public_base_url=public_base_url)
    server = uvicorn.Server(_uvicorn_config(app, host=host, port=port, log_level=log_level))
    server.run()
