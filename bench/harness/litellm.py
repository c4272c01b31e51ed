"""LiteLLM's proxy as a child process, from a virtual environment of its own.

LiteLLM is no dependency of this project: :func:`ensure_venv` installs
``litellm[proxy]==PIN`` into a separate venv (default ``$TMPDIR/flux-bench/litellm-venv``,
reused when it already has that version) and everything runs its ``litellm`` script.

:func:`start_litellm` serves one model, ``flux-dev``, routed as an OpenAI-compatible
``api_base`` to an upstream on 127.0.0.1 (``fake_openai.py``): no database; a random
master key (this version refuses to start without one), which the client sends, so
LiteLLM's requests pay for authentication as flux-proxy's do (a client key in its
database); LiteLLM's default server (uvicorn, uvloop) and workers unless ``workers`` is given,
logging warnings only (``LITELLM_LOG=WARNING``, as the bench runs flux-proxy). LiteLLM
fetches a few files from the internet at start by default (its model cost map and the
like): each is switched to its bundled copy, every such URL points at a closed port on
127.0.0.1, and so do the proxy variables, so nothing leaves the machine.

Also here, what ``bench/compare.py`` measures both proxies with: an :class:`Endpoint`
(one sync POST that ends with the image) measured in a closed loop with its server's
CPU (:func:`measure`, a :class:`Cell`), the resident memory of a process tree
(:func:`tree_rss_bytes`) and a sampler of its peak over a run (:class:`RssPeak`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness.cpu import CpuWindow, process_tree
from bench.harness.load import close_clients, closed_loop, open_clients
from bench.harness.procs import HOST, Service, clean_env, free_port, loopback
from bench.harness.report import percentile

PIN = "1.106.2"  # pinned: 1.107.0 is reported compromised and is not on the index
MODEL = "flux-dev"
UPSTREAM_KEY = "sim-key"
INSTALL_TIMEOUT_S = 1200.0
READY_TIMEOUT_S = 120.0  # LiteLLM imports a lot: ~5-15 s to start on 2 busy cores
READY_PATH = "/health/liveliness"
_OFFLINE = f"http://{HOST}:9/offline"  # the discard port: nothing listens, refused at once
# LiteLLM's own switches for "use the bundled copy" and the URLs it would fetch otherwise.
_LOCAL_SWITCHES = ("LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_LOCAL_BLOG_POSTS",
                   "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "LITELLM_LOCAL_AUTOROUTER_PRESETS",
                   "LITELLM_LOCAL_POLICY_TEMPLATES")
_REMOTE_URLS = ("LITELLM_MODEL_COST_MAP_URL", "LITELLM_BLOG_POSTS_URL",
                "LITELLM_ANTHROPIC_BETA_HEADERS_URL", "LITELLM_AUTOROUTER_PRESETS_URL")
# Variables that would configure LiteLLM (or its providers) behind the benchmark's back.
_FOREIGN = ("LITELLM_", "OPENAI_", "AZURE_", "ANTHROPIC_", "DATABASE_URL", "DIRECT_URL",
            "REDIS_", "PYTHONPATH", "UI_", "STORE_MODEL_IN_DB")


def default_venv() -> Path:
    """``$TMPDIR/flux-bench/litellm-venv`` (the system's temp folder without TMPDIR)."""
    return Path(tempfile.gettempdir()) / "flux-bench" / "litellm-venv"


@dataclass(frozen=True)
class Install:
    venv: Path
    version: str

    @property
    def script(self) -> Path:
        return self.venv / "bin" / "litellm"


def installed_version(venv: Path) -> str | None:
    """The litellm version in ``venv`` (None: no venv, no litellm, or no ``litellm`` script)."""
    python = venv / "bin" / "python"
    if not python.exists() or not (venv / "bin" / "litellm").exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, timeout=60, check=False, env=offline_env())
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def ensure_venv(venv: Path, version: str, log: Callable[[str], None], *,
                any_version: bool = False) -> Install:
    """A venv at ``venv`` with ``litellm[proxy]==version`` (installed with pip, from the
    configured index, unless it is there already; ``any_version``: whatever litellm it
    has will do). RuntimeError with pip's last lines when the install fails."""
    have = installed_version(venv)
    if have is not None and (have == version or any_version):
        log(f"litellm {have}: reusing {venv}")
        return Install(venv, have)
    if have is not None:
        log(f"{venv} has litellm {have}; installing {version} into it")
    if not (venv / "bin" / "python").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    log(f"installing litellm[proxy]=={version} into {venv} (a few minutes the first time)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, f"litellm[proxy]=={version}"], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT_S, check=False, env=env)
    got = installed_version(venv)
    if done.returncode != 0 or got is None:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
        raise RuntimeError(f"pip install litellm[proxy]=={version} failed ({done.returncode}):"
                           f"\n{tail}")
    return Install(venv, got)


def offline_env() -> dict[str, str]:
    """A clean environment for LiteLLM: nothing that configures it behind our back, its
    bundled data instead of downloads, every remote URL and proxy on a closed local port."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(_FOREIGN)
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env |= dict.fromkeys(_LOCAL_SWITCHES, "True") | dict.fromkeys(_REMOTE_URLS, _OFFLINE)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = f"http://{HOST}:9"
    env["NO_PROXY"] = env["no_proxy"] = f"{HOST},localhost"
    env |= {"LITELLM_LOG": "WARNING", "PYTHONUNBUFFERED": "1"}
    return env


def config(upstream_url: str, master_key: str) -> dict[str, object]:
    """One model, :data:`MODEL`, routed to ``upstream_url`` as an OpenAI-compatible API."""
    return {
        "general_settings": {"master_key": master_key},
        "model_list": [{
            "model_name": MODEL,
            "litellm_params": {"model": f"openai/{MODEL}",
                               "api_base": loopback(upstream_url) + "/v1",
                               "api_key": UPSTREAM_KEY},
            "model_info": {"mode": "image_generation"},
        }],
    }


def start_litellm(install: Install, workdir: Path, upstream_url: str, *,
                  workers: int | None = None) -> tuple[Service, str, str]:
    """LiteLLM's proxy on a free port of 127.0.0.1 (config: ``workdir/litellm.yaml``, log:
    ``litellm.log``), once it answers its liveness probe; its base URL and master key."""
    path = workdir / "litellm.yaml"
    master_key = "sk-" + secrets.token_hex(32)
    path.write_text(json.dumps(config(upstream_url, master_key), indent=2) + "\n")  # JSON is YAML
    port = free_port()
    argv = [str(install.script), "--config", str(path), "--host", HOST, "--port", str(port)]
    if workers is not None:
        argv += ["--num_workers", str(workers)]
    svc = Service("litellm", argv, workdir / "litellm.log", env=offline_env(), cwd=workdir)
    url = f"http://{HOST}:{port}"
    try:
        svc.wait_ready(url + READY_PATH, READY_TIMEOUT_S)
    except BaseException:
        svc.stop()
        raise
    return svc, url, master_key


def images_body() -> dict[str, object]:
    """The OpenAI image request both sides of LiteLLM's column send (overhead's BODY).
    No ``response_format``: LiteLLM refuses it for an ``openai/`` model that is not
    ``dall-e-*``; the upstream's default decides (``fake_openai --b64``)."""
    return {"model": MODEL, "prompt": "a lighthouse at dusk, oil painting", "n": 1,
            "size": "1024x1024"}


# --------------------------------------------------------------------------- measuring


@dataclass
class Endpoint:
    """One POST that ends with the image (sync mode), and how to tell it succeeded
    (``check`` raises BenchError otherwise)."""

    base_url: str
    path: str
    body: dict[str, Any]
    check: Callable[[httpx.Response], None]
    headers: dict[str, str] = field(default_factory=dict)

    async def op(self, client: httpx.AsyncClient, _i: int) -> float:
        t0 = time.perf_counter()
        r = await client.post(self.path, json=self.body)
        elapsed = time.perf_counter() - t0
        self.check(r)
        return elapsed


@dataclass
class Cell:
    """One measured window: one endpoint at one concurrency (CPU in seconds, nan when
    the window never started)."""

    latencies_s: list[float]
    error_kinds: dict[str, int]
    wall_s: float
    server_cpu_s: float
    upstream_cpu_s: float
    client_cpu_s: float
    other_cpu_s: float
    truncated: bool

    @property
    def n(self) -> int:
        return len(self.latencies_s)

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    def p(self, q: float) -> float:
        return percentile(self.latencies_s, q)

    @property
    def rps(self) -> float:
        return self.n / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def cpu_ms_per_req(self) -> float:
        return self.server_cpu_s / self.n * 1000 if self.n else math.nan

    def summary(self) -> dict[str, Any]:
        return {"n": self.n, "errors": self.errors, "error_kinds": self.error_kinds,
                "wall_s": round(self.wall_s, 4), "rps": round(self.rps, 2),
                **{f"{k}_ms": round(self.p(q) * 1000, 3) for k, q in
                   (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
                "server_cpu_s": self.server_cpu_s, "upstream_cpu_s": self.upstream_cpu_s,
                "client_cpu_s": self.client_cpu_s, "other_cpu_s": self.other_cpu_s,
                "truncated": self.truncated}


async def measure(ep: Endpoint, conc: int, n: int, *, warmup: int, op_timeout_s: float,
                  window_s: float, server_pid: int, upstream_pid: int) -> Cell:
    """``n`` requests from ``conc`` closed-loop workers (one connection each), after a
    warm-up of ``warmup`` (at least one per worker; 0: none); the server's and the
    upstream's process-tree CPU over the measured window."""
    warm = min(max(warmup, conc), n) if warmup else 0
    clients = open_clients(ep.base_url, conc, op_timeout_s, ep.headers)
    window: CpuWindow | None = None

    def on_measure() -> None:
        nonlocal window
        window = CpuWindow({"server": server_pid, "upstream": upstream_pid})

    try:
        done = await closed_loop(ep.op, clients, n, warmup=warm, on_measure=on_measure,
                                 op_timeout_s=op_timeout_s, window_s=window_s)
        cpu = window.stop() if window is not None else None
    finally:
        await close_clients(clients)
    nan = math.nan
    return Cell(done.results, done.error_kinds, done.wall_s,
                cpu.trees["server"] if cpu else nan, cpu.trees["upstream"] if cpu else nan,
                cpu.own_s if cpu else nan, cpu.other_s if cpu else nan, done.truncated)


# --------------------------------------------------------------------------- memory


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, summed (0 when unreadable). Pages
    shared by forked workers count once per process, as ``ps`` shows them."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
    return total


class RssPeak:
    """Samples the watched trees' RSS every ``interval_s`` from :meth:`start` until
    :meth:`stop` (at most ``max_samples`` times): the peak of each, in bytes."""

    def __init__(self, watch: Mapping[str, int], interval_s: float = 0.1,
                 max_samples: int = 36_000) -> None:
        self.watch = dict(watch)
        self.interval_s = interval_s
        self.max_samples = max_samples
        self.peaks = dict.fromkeys(self.watch, 0)
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        for name, pid in self.watch.items():
            self.peaks[name] = max(self.peaks[name], tree_rss_bytes(pid))

    async def _run(self) -> None:
        for _ in range(self.max_samples):
            self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> dict[str, int]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()
        return dict(self.peaks)
