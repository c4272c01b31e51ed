"""CPU per upstream call: WaveSpeed polls (and submits) against a loopback upstream.

    .venv/bin/python -m bench.http_calls                  # every variant, c = 1, 50, 500
    .venv/bin/python -m bench.http_calls --seconds 2 --concurrency 1 50 500 --op poll submit
    .venv/bin/python -m bench.http_calls --variant old new

The upstream is a tiny HTTP/1.1 keep-alive server in a child process (raw asyncio
protocol, uvloop when installed: it costs the measured process nothing); it answers
every GET with a WaveSpeed poll envelope ("processing") and every POST with a
"created" one. N concurrent tasks each call `WaveSpeedProvider.poll` (or `.submit`)
in a loop for `--seconds`, after a warm-up; the figures are this process's CPU time
(`time.process_time`) per call and calls per second of wall time.

Variants, all in one run:
  old    the adapter as it was at `--baseline-rev` (its providers/_http.py, base.py and
         wavespeed.py loaded from git into a throw-away package): one AsyncClient,
         base_url merged and the URL string parsed per call, max_connections 200.
  new    the adapter as it is now (the default settings).
  stock  the adapter as it is now with lean_pool = false (httpcore's own pool).
Loopback only; bounded: at most len(variants) x len(concurrency) x len(op) cells of
`--seconds` each (default 3 x 3 x 1 x 2 s).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REV = "87cfae6"

_POLL_BODY = json.dumps({
    "code": 200, "message": "success",
    "data": {"id": "task-1", "status": "processing", "outputs": [],
             "urls": {"get": "http://127.0.0.1:{port}/api/v3/predictions/task-1/result"},
             "has_nsfw_contents": [], "error": "", "timings": {"inference": None}},
})
_SUBMIT_BODY = _POLL_BODY.replace('"processing"', '"created"')


# --------------------------------------------------------------------------- upstream


def _serve(sock: socket.socket) -> None:  # child process
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    port = sock.getsockname()[1]
    poll = _POLL_BODY.replace("{port}", str(port)).encode()
    submit = _SUBMIT_BODY.replace("{port}", str(port)).encode()

    def answer(body: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)

    answers = {b"GET": answer(poll), b"POST": answer(submit)}

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while True:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end]
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(self.buf) < end + 4 + length:
                    return
                self.buf = self.buf[end + 4 + length:]
                self.t.write(answers.get(head.split(b" ", 1)[0], answers[b"GET"]))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Upstream, sock=sock, backlog=1024)
        await server.serve_forever()

    asyncio.run(main())


# --------------------------------------------------------------------------- variants


def _baseline(rev: str) -> Any:
    """The providers package at `rev` (only what the WaveSpeed adapter imports)."""
    tmp = Path(tempfile.mkdtemp(prefix="http_calls_"))
    pkg = tmp / "providers_baseline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("_http.py", "base.py", "wavespeed.py"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:providers/{name}"],
                              check=True, capture_output=True, text=True).stdout
        (pkg / name).write_text(text)
    sys.path.insert(0, str(tmp))
    return importlib.import_module("providers_baseline.wavespeed")


def _provider(variant: str, port: int, baseline: Any) -> Any:
    from pydantic import SecretStr

    from providers import wavespeed
    mod = baseline if variant == "old" else wavespeed
    kw: dict[str, Any] = {"base_url": f"http://127.0.0.1:{port}", "api_key": SecretStr("k")}
    if variant == "stock":
        kw["lean_pool"] = False
    return mod.WaveSpeedProvider("wavespeed", mod.WaveSpeedSettings(**kw)), mod


async def _cell(variant: str, port: int, baseline: Any, concurrency: int, op: str,
                seconds: float) -> dict[str, Any]:
    provider, mod = _provider(variant, port, baseline)
    job = mod.UpstreamJob(upstream_id="task-1", status=mod.JobStatus.PROCESSING,
                          poll_url=f"http://127.0.0.1:{port}/api/v3/predictions/task-1/result")
    req = mod.GenerationRequest(prompt="a lighthouse", seed=1)
    errors = 0

    async def one() -> None:
        nonlocal errors
        try:
            if op == "poll":
                await provider.poll(job)
            else:
                await provider.submit(req)
        except Exception:  # counted, not raised: a cell must finish
            errors += 1

    async def worker(stop: float, counts: list[int]) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < stop:
            await one()
            counts[0] += 1

    loop = asyncio.get_running_loop()
    try:
        warm = [0]
        await asyncio.gather(*(worker(loop.time() + min(0.5, seconds / 4), warm)
                               for _ in range(concurrency)))
        counts = [0]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(loop.time() + seconds, counts)
                               for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await provider.aclose()
    n = max(counts[0], 1)
    return {"variant": variant, "op": op, "concurrency": concurrency, "calls": counts[0],
            "cpu_us_per_call": round(cpu / n * 1e6), "calls_per_s": round(counts[0] / wall),
            "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", nargs="+", default=["old", "stock", "new"],
                    choices=["old", "stock", "new"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 50, 500])
    ap.add_argument("--op", nargs="+", default=["poll"], choices=["poll", "submit"])
    ap.add_argument("--seconds", type=float, default=2.0, help="measured time per cell")
    ap.add_argument("--baseline-rev", default=BASELINE_REV,
                    help="git revision whose adapter is the 'old' variant")
    ap.add_argument("--uvloop", action="store_true", help="run the measured side on uvloop")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if not 0 < args.seconds <= 30 or not all(0 < c <= 2000 for c in args.concurrency):
        ap.error("--seconds in (0, 30], --concurrency in 1..2000")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    server = multiprocessing.get_context("fork").Process(target=_serve, args=(sock,),
                                                         daemon=True)
    server.start()
    sock.close()
    baseline = _baseline(args.baseline_rev) if "old" in args.variant else None
    if args.uvloop:
        import uvloop
        uvloop.install()
    rows = []
    try:
        print(f"{'variant':8} {'op':6} {'c':>5} {'calls':>7} {'CPU us/call':>12} "
              f"{'calls/s':>8} {'errors':>6}", flush=True)
        for op in args.op:
            for c in args.concurrency:
                for v in args.variant:
                    r = asyncio.run(_cell(v, port, baseline, c, op, args.seconds))
                    rows.append(r)
                    print(f"{v:8} {op:6} {c:>5} {r['calls']:>7} {r['cpu_us_per_call']:>12} "
                          f"{r['calls_per_s']:>8} {r['errors']:>6}", flush=True)
    finally:
        server.terminate()
        server.join(5)
    if args.json:
        args.json.write_text(json.dumps({"pid": os.getpid(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
