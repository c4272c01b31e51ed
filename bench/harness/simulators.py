"""The WaveSpeed and VibeDream simulators as child processes on 127.0.0.1.

``flux-proxy simulate KIND``, or (``after_accept``) this module run as
``python -m bench.harness.simulators KIND --port N``: the same simulator app, whose
``error_rate`` means "that fraction of *accepted* jobs then fail" (WaveSpeed
``data.code`` 5000) instead of "that fraction of submits is answered HTTP 500". The
simulator has that fault only as all-or-nothing (``fail_after_accept``) or per request
(a ``[sim:fail-after-accept]`` prompt directive, which a proxy would forward to its
next provider too), hence this variant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.harness.procs import HOST, REPO, Service, clean_env, cli, free_port

SIM_KEY = "sim-key"


class Simulator(Service):
    """A running simulator; ``control`` reaches its ``/_sim`` endpoints."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, *,
                 cwd: Path | None = None) -> None:
        super().__init__(name, argv, log, env=clean_env(repo_on_path=True), cwd=cwd)
        self.port = port
        self.url = f"http://{HOST}:{port}"

    def control(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET ``path`` (POST ``body`` when given): its JSON answer."""
        if body is None:
            r = httpx.get(self.url + path, timeout=5.0, trust_env=False)
        else:
            r = httpx.post(self.url + path, json=body, timeout=5.0, trust_env=False)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def wait_healthy(self) -> None:
        self.wait_ready(self.url + "/_sim/health")


def start_simulator(kind: str, job_latency_s: float, workdir: Path, *,
                    after_accept: bool = False, name: str | None = None,
                    wait: bool = True) -> Simulator:
    """A ``kind`` simulator (wavespeed, vibedream) with a fixed job latency, logging to
    ``workdir/<name>.log``; ``wait``: return once it answers its health check."""
    port = free_port()
    args = [kind, "--host", HOST, "--port", str(port), "--job-latency", str(job_latency_s),
            "--api-key", SIM_KEY]
    if after_accept:
        argv, cwd = [sys.executable, "-m", "bench.harness.simulators", *args], REPO
        name = name or f"{kind}-after-accept"
    else:
        argv, cwd = [*cli(), "simulate", *args], None
        name = name or kind
    sim = Simulator(name, argv, port, workdir / f"{name}.log", cwd=cwd)
    if wait:
        try:
            sim.wait_healthy()
        except BaseException:
            sim.stop()
            raise
    return sim


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the after-accept variant (see the module's docstring) until SIGINT."""
    import uvicorn

    from providers.simulators import SimConfig, create_app
    from providers.simulators.faults import Faults
    from providers.simulators.jobs import Failure

    class AfterAcceptFaults(Faults):
        def submit_status(self, d: Any) -> int | None:
            if d.http_status is not None:
                return int(d.http_status)
            if self.chance(self.config.rate_limit) or not self.take_token():
                return 429
            return None  # error_rate is spent on accepted jobs instead

        def failure(self, d: Any) -> Failure | None:
            drawn = super().failure(d)
            if drawn is None and self.chance(self.config.error_rate):
                return Failure(self.config.fail_code)
            return drawn

    ap = argparse.ArgumentParser(prog="python -m bench.harness.simulators")
    ap.add_argument("kind", choices=["wavespeed", "vibedream"])
    ap.add_argument("--host", default=HOST, choices=[HOST])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--job-latency", type=float, default=0.1)
    ap.add_argument("--api-key", default=SIM_KEY)
    args = ap.parse_args(argv)
    app = create_app(args.kind, SimConfig(api_key=args.api_key, job_latency_s=args.job_latency))
    app.faults = AfterAcceptFaults(app.config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
