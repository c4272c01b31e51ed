"""CPU the proxy spends *serving* a request: HTTP in, auth, validation, rendering, HTTP out.

Not the lifecycle, the database or upstream calls: the app is the real one
(``proxy.app.create_app``: its middleware, guards, dependencies, exception handlers,
compression and Prometheus configuration), but its lifespan is not run. Instead
``app.state`` gets

* a stub ``PredictionService`` whose ``submit`` answers at once with one prebuilt
  prediction (one attempt, processing) and whose ``get`` returns it;
* the real ``Auth`` (HMAC of the key, the key lookup cache, the local rate limiter: a
  rate high enough never to refuse) over a stub store that knows one key.

Routes measured: ``POST /v1/predictions`` (202), ``GET /v1/predictions/{id}`` (200),
``GET /healthz`` (200). Each one ``--warmup`` times, then ``--rounds`` rounds of
``--requests`` requests, sequentially; the figure is the median round's CPU time per
request (``time.process_time``: user + system of this process) in microseconds.

Two drivers:

* ``asgi`` (default): the ASGI app called in this process with prebuilt scopes on a uvloop
  loop: litestar and our code only.
* ``uvicorn``: the app behind uvicorn in a child process (``httptools``, uvloop, the
  proxy's own ``ClientTimeoutProtocol``, as ``flux-proxy serve`` runs it), one keep-alive
  connection from a raw-socket client here; the figure is the child's CPU (``/proc``)
  per request: HTTP parsing and writing included.

Before/after: run this script against an export of the older commit::

    git archive HEAD | tar -x -C /tmp/snap && PYTHONPATH=/tmp/snap \\
        .venv/bin/python bench/serving.py --code /tmp/snap

``--code DIR`` puts DIR first on ``sys.path`` (and on the child's, for ``uvicorn``), so the
same bench measures the other tree's ``proxy`` package.

    .venv/bin/python bench/serving.py                      # both drivers, ~1 min
    .venv/bin/python bench/serving.py --driver asgi --requests 2000 --rounds 1   # smoke

Every loop is bounded by a count; the child process is always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_CODE: str | None = None
if "--code" in sys.argv:  # before any proxy import: measure that tree's code
    _CODE = str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve())
    sys.path.insert(0, _CODE)
elif not __package__:  # run by path: this checkout, not one on PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEY = "fpk_bench_serving_key_0123456789abcdefghijklmnopq"
SECRET = "bench-serving-secret"
BODY = json.dumps({"prompt": "a lighthouse at dusk, oil painting", "size": "1024*768",
                   "seed": 42, "num_inference_steps": 28}).encode()
HOST = "127.0.0.1"


# --------------------------------------------------------------------------- the app


def build_app() -> Any:
    """The real app with stub state (no lifespan): serving cost only."""
    from datetime import UTC, datetime

    from pydantic import SecretStr

    from proxy.accounts.auth import Auth, hash_key
    from proxy.accounts.ratelimit import LocalRateLimiter
    from proxy.app import create_app
    from proxy.config import Settings
    from proxy.lifecycle.run import Run
    from proxy.lifecycle.service import PredictionService
    from proxy.store.models import ApiKey, Attempt, Prediction

    settings = Settings(log_level="info", key_secret=SecretStr(SECRET),
                        admin_key=SecretStr("bench-admin-key"), public_base_url="")
    app = create_app(settings, migrate=False)
    now = datetime(2026, 12, 2, 4, 45, 0, 123456, tzinfo=UTC)
    pred = Prediction(id="0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", model="flux-dev",
                      status="processing", request={"prompt": "x"}, seed=42, provider="wavespeed",
                      created_at=now, updated_at=now, started_at=now,
                      timings={"queue_ms": 1})
    attempt = Attempt(id=1, prediction_id=pred.id, seq=1, provider="wavespeed",
                      upstream_id="c0ffee0123456789", status="processing", created_at=now)
    key_row = ApiKey(id="key_0123456789abcdef", name="bench", prefix=KEY[:12],
                     key_hash=hash_key(KEY, SECRET.encode()), rate_per_s=1e9, burst=10**9,
                     created_at=now)

    class StubStore:
        async def key_by_hash(self, digest: str) -> ApiKey | None:
            return key_row if digest == key_row.key_hash else None

        async def meta_value(self, name: str, default: str) -> str:
            return default

    class StubService(PredictionService):  # a PredictionService to litestar's signature check
        def __init__(self) -> None:
            self.store = StubStore()  # type: ignore[assignment]

        async def submit(self, req: Any, principal: Any = None) -> Run:
            req.to_generation(req.seed)  # what the real one does first (cheap)
            return Run(pred=pred, attempts=[attempt])

        async def wait(self, run: Run, timeout_s: float) -> bool:
            return True

        async def get(self, prediction_id: str, principal: Any = None
                      ) -> tuple[Prediction, list[Attempt]]:
            return pred, [attempt]

    app.state.service = StubService()
    app.state.provider_settings = settings.provider_settings()
    app.state.auth = Auth(StubStore(), enabled=True, admin_key="bench-admin-key",  # type: ignore[arg-type]
                          key_secret=SECRET, limiter=LocalRateLimiter())
    app.state.pred_id = pred.id
    return app


def routes(pred_id: str) -> list[tuple[str, str, str, bytes, int]]:
    """(name, method, path, body, expected status)."""
    return [
        ("POST /v1/predictions", "POST", "/v1/predictions", BODY, 202),
        ("GET /v1/predictions/{id}", "GET", f"/v1/predictions/{pred_id}", b"", 200),
        ("GET /healthz", "GET", "/healthz", b"", 200),
    ]


def _headers(method: str, body: bytes, auth: bool) -> list[tuple[bytes, bytes]]:
    h = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"bench-serving/1"),
         (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate")]
    if auth:
        h.append((b"authorization", b"Bearer " + KEY.encode()))
    if method == "POST":
        h += [(b"content-type", b"application/json"),
              (b"content-length", str(len(body)).encode())]
    return h


# --------------------------------------------------------------------------- drivers


async def _asgi_once(app: Any, scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def run_asgi(app: Any, n: int, rounds: int, warmup: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, method, path, body, expect in routes(app.state.pred_id):
        template = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": _headers(method, body, auth=path.startswith("/v1")),
            "client": (HOST, 50000), "server": (HOST, 8080),
        }
        status, payload = await _asgi_once(app, {**template, "state": {}}, body)
        if status != expect:
            raise SystemExit(f"{name}: {status} {payload[:300]!r}")
        for _ in range(warmup):
            await _asgi_once(app, {**template, "state": {}}, body)
        per: list[float] = []
        walls: list[float] = []
        for _ in range(rounds):
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                await _asgi_once(app, {**template, "state": {}}, body)
            per.append((time.process_time() - c0) / n * 1e6)
            walls.append((time.perf_counter() - w0) / n * 1e6)
        out[name] = {"cpu_us": statistics.median(per), "rounds_cpu_us": per,
                     "wall_us": statistics.median(walls), "bytes": len(payload)}
    return out


def serve_child(port: int) -> None:
    """The child of the uvicorn driver: the stub app as `flux-proxy serve` runs it."""
    import uvicorn

    from proxy.client_timeouts import protocol_class

    app = build_app()
    http = protocol_class(header_timeout_s=10.0, body_timeout_s=30.0)
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False,
                proxy_headers=True, server_header=False, http=http, loop="uvloop",
                lifespan="off")


def _proc_cpu(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawClient:
    """One keep-alive HTTP/1.1 connection; responses must carry content-length."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, raw: bytes) -> tuple[int, bytes]:
        self.sock.sendall(raw)
        while b"\r\n\r\n" not in self.buf:
            self._read()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(rest) < length:
            self._read()
            rest = self.buf.partition(b"\r\n\r\n")[2]
        self.buf = rest[length:]
        return status, rest[:length]

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk


def run_uvicorn(n: int, rounds: int, warmup: int) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    if _CODE:
        env["PYTHONPATH"] = os.pathsep.join([_CODE, env.get("PYTHONPATH", "")])
    args = [sys.executable, str(Path(__file__).resolve()), "--serve-child", str(port)]
    if _CODE:
        args += ["--code", _CODE]
    child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = RawClient(port)
                break
            except OSError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise SystemExit("the uvicorn child did not start") from None
                time.sleep(0.1)
        # the prediction's id is fixed by build_app
        from proxy.store.models import Prediction  # noqa: F401  (same tree as the child)

        out: dict[str, Any] = {}
        pred_id = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
        for name, method, path, body, expect in routes(pred_id):
            head = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
                k + b": " + v + b"\r\n" for k, v in _headers(method, body, path.startswith("/v1")))
            raw = head + b"\r\n" + body
            status, payload = client.request(raw)
            if status != expect:
                raise SystemExit(f"{name}: {status} {payload[:300]!r}")
            for _ in range(warmup):
                client.request(raw)
            per: list[float] = []
            for _ in range(rounds):
                c0 = _proc_cpu(child.pid)
                for _ in range(n):
                    client.request(raw)
                per.append((_proc_cpu(child.pid) - c0) / n * 1e6)
            out[name] = {"cpu_us": statistics.median(per), "rounds_cpu_us": per,
                         "bytes": len(payload)}
        client.sock.close()
        return out
    finally:
        child.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(10)
        if child.poll() is None:
            child.kill()
            child.wait()


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--driver", choices=["asgi", "uvicorn", "both"], default="both")
    p.add_argument("--requests", type=int, default=5000, help="per round and route")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--code", help="a tree to measure instead of this checkout (an export)")
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--serve-child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_child:
        serve_child(a.serve_child)
        return
    n = max(1, min(a.requests, 200_000))
    rounds = max(1, min(a.rounds, 20))
    warmup = max(0, min(a.warmup, 50_000))
    results: dict[str, Any] = {"code": _CODE or str(Path(__file__).resolve().parents[1]),
                               "requests": n, "rounds": rounds}
    if a.driver in ("asgi", "both"):
        import uvloop

        results["asgi"] = uvloop.run(run_asgi(build_app(), n, rounds, warmup))
    if a.driver in ("uvicorn", "both"):
        results["uvicorn"] = run_uvicorn(n, rounds, warmup)
    print(f"code: {results['code']}  ({n} requests x {rounds} rounds per route, sequential)")
    for driver in ("asgi", "uvicorn"):
        if driver not in results:
            continue
        print(f"\n{driver}: CPU us per request (median round; rounds)")
        for name, r in results[driver].items():
            rs = ", ".join(f"{v:.0f}" for v in r["rounds_cpu_us"])
            print(f"  {name:28s} {r['cpu_us']:7.1f}   ({rs})  {r['bytes']} B")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
