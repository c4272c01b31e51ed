"""A fake OpenAI-shaped image upstream on 127.0.0.1, for LiteLLM to route to.

``POST /v1/images/generations`` answers after a fixed job latency (the WaveSpeed
simulator's ``job_latency_s``, default 0.05 s) with ``{"created": ..., "data": [{"url":
...}]}``, or ``b64_json`` items (the WaveSpeed simulator's own rendered image, so both
sides carry the same bytes) for ``"response_format": "b64_json"``, or by default when
started with ``--b64``: LiteLLM treats a model that is not ``dall-e-*`` as gpt-image-like
(which always answers base64) and refuses ``response_format``, so its requests omit it.
``GET /assets/...`` serves nothing useful (a 1-byte body); ``GET /_sim/health`` answers
200, so :class:`bench.harness.simulators.Simulator` can start and wait for it.

Raw ASGI, as the simulators are, so its own per-request cost stays far below what sits
in front of it. Run as ``python -m bench.harness.fake_openai --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.harness.load import BenchError, json_object
from bench.harness.procs import HOST, REPO, free_port
from bench.harness.simulators import Simulator

GENERATIONS = "/v1/images/generations"
MAX_IMAGES = 10
SEED = 1234


class FakeOpenAIImages:
    """The ASGI app: OpenAI's image generation route with a fixed latency."""

    def __init__(self, job_latency_s: float, *, b64: bool = False) -> None:
        self.job_latency_s = job_latency_s
        self.default_format = "b64_json" if b64 else "url"
        self.ids = itertools.count(1)
        self.served = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # served with lifespan off
            return
        from providers.simulators.asgi import read_body, respond, respond_json

        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/_sim/health":
            await respond_json(send, 200, {"ok": True, "served": self.served})
            return
        if method == "GET" and path.startswith("/assets/"):
            await respond(send, 200, b"\xff", b"image/jpeg")
            return
        if method != "POST" or path != GENERATIONS:
            await respond_json(send, 404, {"error": {"message": "not found"}})
            return
        body = await read_body(receive)
        if body is None:  # the client left
            return
        answer = self._answer(body, scope)
        if isinstance(answer, str):
            await respond_json(send, 400, {"error": {"message": answer,
                                                     "type": "invalid_request_error"}})
            return
        await asyncio.sleep(self.job_latency_s)
        self.served += 1
        await respond_json(send, 200, answer)

    def _answer(self, raw: bytes, scope: dict[str, Any]) -> dict[str, Any] | str:
        """The 200 body for a request (before the latency), or why it is a 400."""
        import msgspec

        from providers.simulators.images import render_base64

        try:
            req = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return "body is not JSON"
        if not isinstance(req, dict) or not isinstance(req.get("prompt"), str):
            return "prompt is required"
        n = req.get("n") or 1
        size = str(req.get("size") or "1024x1024")
        try:
            width, height = (int(v) for v in size.lower().split("x", 1))
        except ValueError:
            return f"bad size {size!r}"
        if not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
            return f"n must be 1..{MAX_IMAGES}"
        job = next(self.ids)
        if (req.get("response_format") or self.default_format) == "b64_json":
            data = [{"b64_json": render_base64(SEED, i, width, height, "jpeg")}
                    for i in range(n)]
        else:
            host = dict(scope["headers"]).get(b"host", HOST.encode()).decode("latin-1")
            data = [{"url": f"http://{host}/assets/{job}/{i}.jpeg"} for i in range(n)]
        return {"created": int(time.time()), "data": data}


def check_images(response: httpx.Response, n: int = 1) -> None:
    """BenchError unless ``response`` is a 200 OpenAI images answer with ``n`` images."""
    data = json_object(response, 200).get("data")
    if not isinstance(data, list) or len(data) != n:
        raise BenchError(f"images: data is not a list of {n}")
    for item in data:
        if not isinstance(item, dict) or not (item.get("url") or item.get("b64_json")):
            raise BenchError("images: an item has neither url nor b64_json")


def start_fake_openai(job_latency_s: float, workdir: Path, *, b64: bool = False,
                      name: str = "fake-openai") -> Simulator:
    """This module as a child on a free port (log: ``workdir/<name>.log``), once healthy;
    ``b64``: base64 images unless a request asks for URLs."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.harness.fake_openai", "--port", str(port),
            "--job-latency", str(job_latency_s), *(["--b64"] if b64 else [])]
    sim = Simulator(name, argv, port, workdir / f"{name}.log", cwd=REPO)
    try:
        sim.wait_healthy()
    except BaseException:
        sim.stop()
        raise
    return sim


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m bench.harness.fake_openai")
    ap.add_argument("--host", default=HOST, choices=[HOST])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--job-latency", type=float, default=0.05)
    ap.add_argument("--b64", action="store_true", help="b64_json unless asked for url")
    args = ap.parse_args(argv)
    uvicorn.run(FakeOpenAIImages(args.job_latency, b64=args.b64), host=args.host, port=args.port,
                log_level="warning", access_log=False, server_header=False, lifespan="off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
