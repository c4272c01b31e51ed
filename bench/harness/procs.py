"""Child processes of a benchmark: how to run ``flux-proxy``, start, wait, stop.

Every child runs in its own process group with its output in a log file. It is stopped
by :meth:`Service.stop` (SIGINT to the group, then SIGKILL), and by the kernel
(``PR_SET_PDEATHSIG``) if the benchmark dies first, however it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"  # everything listens here and talks only to here
REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Variables that would configure the proxy (or its providers) behind the benchmark's back.
FOREIGN_ENV = ("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_", "LOCAL_WORKER")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def loopback(url: str) -> str:
    """``url`` itself; ValueError unless it points at 127.0.0.1."""
    if urllib.parse.urlsplit(url).hostname != HOST:
        raise ValueError(f"benchmarks talk to {HOST} only, not {url}")
    return url


def cli() -> list[str]:
    """How to run `flux-proxy`: the console script beside this interpreter, if any."""
    script = Path(sys.executable).with_name("flux-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]


def clean_env(*, repo_on_path: bool = False) -> dict[str, str]:
    """This environment minus anything that would configure the proxy behind our back.

    ``repo_on_path``: this checkout goes at the end of PYTHONPATH (for ``python -m
    bench...`` children), after what is there, so an exported commit put first on the
    path (see README) still wins.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    if repo_on_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO)]))
    return env


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the benchmark dies, however it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def popen(argv: list[str], log: Any, *, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """``argv`` in a new process group, output to the open file ``log``, tied to our life."""
    return subprocess.Popen(
        argv, env=dict(env) if env is not None else None, cwd=cwd, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


class Service:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.log = log
        self._fh = log.open("wb")
        self.proc = popen(argv, self._fh, env=clean_env() if env is None else env, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        """The end of its log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, url: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Until GET ``url`` answers 200; RuntimeError (with the log) if the process exits
        or ``timeout_s`` passes first."""
        loopback(url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready at {url} in {timeout_s:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGINT to the whole group (uvicorn shuts down; py-spy writes its profile),
        then SIGKILL if it is still there after STOP_TIMEOUT_S."""
        if self.proc.poll() is None:
            for sig in (signal.SIGINT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._fh.close()


@contextlib.contextmanager
def services() -> Iterator[list[Service]]:
    """A list to put started services in; all are stopped on leaving, last first."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for svc in reversed(started):
            svc.stop()


@contextlib.contextmanager
def sigterm_raises(make: Callable[[int], BaseException]) -> Iterator[None]:
    """Within the block, SIGTERM (a timeout, a kill) raises ``make(signum)``, which
    unwinds through every ``finally``: the children are stopped as on Ctrl-C."""

    def handler(signum: int, _frame: Any) -> None:
        raise make(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cancel_on_sigterm() -> None:
    """In a coroutine: SIGTERM cancels the current task as Ctrl-C does (its ``finally``
    blocks stop the children)."""
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def copy_logs(workdir: Path, dest: Path) -> None:
    """Every ``*.log`` of ``workdir`` into ``dest`` (made if missing)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in workdir.glob("*.log"):
        shutil.copy(f, dest / f.name)


def event_loop_runner() -> asyncio.Runner:
    """The benchmarks' own event loop: uvloop when it is installed (the load generator
    should cost as little CPU as it can), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)
