"""Memory is bounded by configuration: a hostile asset host cannot push RSS past it.

The byte budgets (common/media/budget.py) bound the sum of download bodies
(``max_inflight_download_bytes``) and of image decoding (``max_inflight_decode_bytes``)
in memory at once. Here:

* the budget itself: exact accounting, FIFO, waits that time out hold nothing,
  a reservation that can never fit fails at once;
* a hostile asset host on 127.0.0.1 (a thread server in the test process) that
  streams endless bodies as fast as loopback goes, or lies about Content-Length,
  or serves small files of many pixels; N concurrent base64 normalisations
  (``proxy.lifecycle.outputs.normalize`` on a real WaveSpeed adapter: the real
  download path) run in a *separate* process whose peak RSS (VmHWM, reset
  through /proc/self/clear_refs after a warm-up) is compared with the budget.

The margin (``MARGIN``) is what the budgets do not count: Python and httpx state
per connection, the allocator's slack, thread stacks. Without the budget the
same run peaks at N x max_download_bytes (checked: the unbounded run is asserted
to exceed the bound, so the test can tell the difference).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import media
from common.media import budget as budget_mod
from common.media.budget import ByteBudget, OverBudget

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
MARGIN = 40 * MiB  # what the budgets do not count (see the module docstring)


# --------------------------------------------------------------------------- the budget


async def test_budget_is_exact_and_first_come_first_served() -> None:
    b = ByteBudget(100, name="test_budget")
    await b.acquire(60)
    order: list[str] = []

    async def take(n: int, tag: str) -> None:
        await b.acquire(n)
        order.append(tag)

    big = asyncio.create_task(take(80, "big"))
    await asyncio.sleep(0)
    small = asyncio.create_task(take(10, "small"))  # fits now, but waits behind `big`
    await asyncio.sleep(0.01)
    assert order == [] and b.in_use == 60 and b.waiting == 2
    b.release(60)
    await asyncio.wait_for(asyncio.gather(big, small), 1)
    assert order == ["big", "small"] and b.in_use == 90
    b.release(90)
    assert b.in_use == 0


async def test_budget_wait_times_out_holding_nothing() -> None:
    b = ByteBudget(10, name="test_budget")
    await b.acquire(10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await b.acquire(5)
    assert b.in_use == 10 and b.waiting == 0
    b.release(10)
    assert b.try_acquire(10)


async def test_budget_refuses_what_can_never_fit() -> None:
    b = ByteBudget(1000, name="max_inflight_test_bytes")
    with pytest.raises(OverBudget, match="more than this process's whole max_inflight_test_bytes"):
        await b.acquire(1001, what="the image download")
    assert b.in_use == 0


async def test_budget_run_releases_when_the_thread_ends_not_before() -> None:
    b = ByteBudget(100, name="test_budget")
    gate = threading.Event()
    task = asyncio.create_task(b.run(100, gate.wait, 5))
    await asyncio.sleep(0.05)
    task.cancel()  # the caller stops waiting; the thread still holds its memory
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.in_use == 100
    gate.set()
    for _ in range(100):
        if b.in_use == 0:
            break
        await asyncio.sleep(0.01)
    assert b.in_use == 0


async def test_budget_run_wait_is_bounded() -> None:
    b = ByteBudget(100, name="max_inflight_test_bytes")
    await b.acquire(100)
    with pytest.raises(media.BudgetWait, match="max_inflight_test_bytes"):
        await b.run(1, len, b"x", what="decoding the output", wait_s=0.05)
    b.release(100)


def test_data_uri_bytes_is_the_data_uri() -> None:
    data = os.urandom(3 * 256 * 1024 * 2 + 5)  # crosses the encoder's step twice, unaligned
    import base64

    expected = "data:image/png;base64," + base64.b64encode(data).decode()
    assert media.to_data_uri(data, "png") == expected
    assert media.data_uri_length(len(data), "png") == len(expected)


def test_data_uri_decode_cost_reads_the_header() -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1000, 500)).save(buf, "PNG")
    uri = media.to_data_uri(buf.getvalue(), "png")
    cost = media.data_uri_decode_cost(uri, max_bytes=10 * MiB)
    assert cost >= media.decode_cost("png", 1000, 500)
    assert cost < media.decode_cost("png", 1000, 500) + len(uri) + len(buf.getvalue()) + 16
    assert media.data_uri_decode_cost("data:image/png;base64,!!!", max_bytes=MiB) < 100


# --------------------------------------------------------------------------- wiring


async def test_inline_images_wait_for_the_decode_budget_then_503() -> None:
    from litestar.exceptions import ServiceUnavailableException

    from proxy.api.inputs import RequestImageChecker
    from proxy.schema import GenerateRequest

    req = GenerateRequest(prompt="x", image=media.to_data_uri(_png(128, 128), "png"))
    busy = ByteBudget(64 * MiB, name="max_inflight_decode_bytes")
    await busy.acquire(64 * MiB)
    checker = RequestImageChecker(budget=busy, decode_wait_s=0.1)
    with pytest.raises(ServiceUnavailableException):
        await checker.check(req)
    busy.release(64 * MiB)
    assert await checker.check(req) == []
    assert busy.in_use == 0
    # One that could never fit is the client's 422, saying why.
    tiny = RequestImageChecker(budget=ByteBudget(MiB, name="max_inflight_decode_bytes"))
    (error,) = await tiny.check(req)
    assert error.field == "image" and "max_inflight_decode_bytes" in error.reason


def test_settings_refuse_a_download_the_budget_could_never_hold() -> None:
    from pydantic import ValidationError

    from proxy.config import Settings

    with pytest.raises(ValidationError, match="exceeds max_inflight_download_bytes"):
        Settings(max_inflight_download_bytes=16 * MiB)  # providers default to 32 MiB
    with pytest.raises(ValidationError, match="max_inflight_decode_bytes"):
        Settings(max_inflight_decode_bytes=64 * MiB)  # a 32 MiB data URI needs ~85 MiB
    s = Settings(max_inflight_download_bytes=64 * MiB, max_inflight_decode_bytes=128 * MiB)
    assert (s.max_inflight_download_bytes, s.max_inflight_decode_bytes) == (64 * MiB, 128 * MiB)


def test_serve_sizes_the_budgets_and_the_client_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn
    from click.testing import CliRunner

    from proxy import cli
    from proxy.client_timeouts import ClientTimeoutProtocol

    seen: dict[str, Any] = {}

    def run(server: uvicorn.Server, sockets: Any = None) -> None:  # instead of serving
        seen["http"] = server.config.http
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    for name in ("FLUX_PROXY_CONFIG", "FLUX_PROXY_MAX_INFLIGHT_DOWNLOAD_BYTES"):
        monkeypatch.delenv(name, raising=False)
    before = (budget_mod.downloads().capacity, budget_mod.decoding().capacity)
    try:
        r = CliRunner().invoke(cli.main, ["serve"], env={
            "FLUX_PROXY_MAX_INFLIGHT_DOWNLOAD_BYTES": str(96 * MiB),
            "FLUX_PROXY_MAX_INFLIGHT_DECODE_BYTES": str(200 * MiB),
            "FLUX_PROXY_CLIENT_HEADER_TIMEOUT_S": "7", "FLUX_PROXY_CLIENT_BODY_TIMEOUT_S": "9",
            "FLUX_PROXY_DATABASE_URL": "sqlite+aiosqlite:///:memory:"})
        assert r.exit_code == 0, r.output
        assert budget_mod.downloads().capacity == 96 * MiB
        assert budget_mod.decoding().capacity == 200 * MiB
        assert issubclass(seen["http"], ClientTimeoutProtocol)
        assert (seen["http"].header_timeout_s, seen["http"].body_timeout_s) == (7.0, 9.0)
    finally:
        budget_mod.configure(download_bytes=before[0], decode_bytes=before[1])


# --------------------------------------------------------------------------- the hostile host


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")  # compresses to little
    return out.getvalue()


class _Hostile(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block = b"\xff" * MiB
    small = b""
    many_pixels = b""


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head:
            got = sock.recv(4096)
            if not got:
                return
            head += got
        path = head.split(b" ", 2)[1].decode()
        server: Any = self.server
        try:
            if path.startswith("/endless"):  # no length: read until close, forever
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\n"
                             b"connection: close\r\n\r\n\x89PNG\r\n\x1a\n")
                while True:
                    sock.sendall(server.block)
            elif path.startswith("/lying"):  # says 1 MiB, sends forever
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\n"
                             b"content-length: 1048576\r\nconnection: close\r\n\r\n")
                while True:
                    sock.sendall(server.block)
            elif path.startswith("/pixels"):  # a few KB that decode to many MiB
                body = server.many_pixels
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
            else:
                body = server.small
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        except OSError:
            return  # the client gave up: that is the point


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    server = _Hostile(("127.0.0.1", 0), _Handler)
    server.small = _png(64, 64)
    server.many_pixels = _png(2048, 2048)  # ~16 MiB of pixels each, a few KB on the wire
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _probe_in_subprocess(**params: Any) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, __file__, json.dumps(params)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _show(result: dict[str, Any]) -> str:
    return (f"growth {result['growth'] / MiB:.0f} MiB (base {result['base'] / MiB:.0f} MiB), "
            f"{result['elapsed']:.1f}s, errors {sorted(set(result['errors']))[:4]}")


def test_endless_bodies_cannot_push_rss_past_the_download_budget(hostile: str) -> None:
    """8 base64 predictions x 4 outputs, each output an endless stream."""
    limit, inflight = 16 * MiB, 48 * MiB
    result = _probe_in_subprocess(base=hostile, path="/endless", requests=8, images=4,
                                  max_download_bytes=limit, download_bytes=inflight,
                                  decode_bytes=64 * MiB)
    assert result["failed"] == 8 and result["completed"] == 0, _show(result)
    # Each failed cleanly, on the size limit, not out of memory.
    assert all(f"image is larger than {limit} bytes" in e for e in result["errors"]), _show(result)
    assert result["growth"] < inflight + MARGIN, _show(result)
    assert result["in_use_after"] == [0, 0]


def test_a_lying_content_length_is_cut_at_what_was_declared(hostile: str) -> None:
    result = _probe_in_subprocess(base=hostile, path="/lying", requests=4, images=4,
                                  max_download_bytes=16 * MiB, download_bytes=48 * MiB,
                                  decode_bytes=64 * MiB)
    assert result["failed"] == 4, _show(result)
    assert result["growth"] < 48 * MiB + MARGIN, _show(result)
    assert result["in_use_after"] == [0, 0]


def test_many_pixel_outputs_decode_within_the_decode_budget(hostile: str) -> None:
    """Small files of 2048x2048 pixels: the decode budget, not the bytes, bounds them."""
    decode = 48 * MiB
    result = _probe_in_subprocess(base=hostile, path="/pixels", requests=8, images=4,
                                  max_download_bytes=16 * MiB, download_bytes=48 * MiB,
                                  decode_bytes=decode)
    assert result["completed"] == 8 and result["failed"] == 0, _show(result)
    assert result["growth"] < decode + MARGIN, _show(result)
    assert result["in_use_after"] == [0, 0]


def test_without_the_budget_the_same_host_takes_what_it_likes(hostile: str) -> None:
    """The check above can tell: budgets as large as the sum let RSS reach it."""
    limit = 16 * MiB
    result = _probe_in_subprocess(base=hostile, path="/endless", requests=8, images=4,
                                  max_download_bytes=limit, download_bytes=4096 * MiB,
                                  decode_bytes=4096 * MiB)
    assert result["failed"] == 8, _show(result)
    assert result["growth"] > 48 * MiB + MARGIN, _show(result)


async def test_a_download_waits_for_the_budget_then_times_out_clearly(hostile: str) -> None:
    import httpx

    b = ByteBudget(8 * MiB, name="max_inflight_download_bytes")
    await b.acquire(8 * MiB)  # someone else holds it all
    guard = media.OutboundGuard(allow_private=True)
    async with httpx.AsyncClient() as client:
        with pytest.raises(media.MediaError, match=r"waited 0\.5s for memory"):
            await media.download(client, f"{hostile}/small.png", max_bytes=MiB, timeout_s=0.5,
                                 guard=guard, budget=b)
        b.release(8 * MiB)
        data, _ = await media.download(client, f"{hostile}/small.png", max_bytes=MiB,
                                       timeout_s=2, guard=guard, budget=b)
        assert media.sniff_format(data) == "png"
        with media.holding(b) as claim:  # held until the block ends
            data, _ = await media.download(client, f"{hostile}/small.png", max_bytes=MiB,
                                           timeout_s=2, guard=guard, budget=b)
            assert claim.held == len(data) == b.in_use
    assert b.in_use == 0


# --------------------------------------------------------------------------- the probe process


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


async def _probe(p: dict[str, Any]) -> dict[str, Any]:
    import gc

    from providers.base import GenerationRequest, JobStatus, ProviderError, UpstreamJob
    from providers.registry import build_provider
    from proxy.lifecycle import outputs

    configure = getattr(budget_mod, "configure", None)
    if configure is not None:
        configure(download_bytes=p["download_bytes"], decode_bytes=p["decode_bytes"])
    host = p["base"].removeprefix("http://").split(":")[0]
    provider = build_provider("wavespeed", "wavespeed", {
        "base_url": "http://127.0.0.1:9", "api_key": "k", "asset_hosts": [host],
        "allow_private_asset_hosts": True, "max_download_bytes": p["max_download_bytes"],
        "download_timeout_s": 20.0, "max_connections": 1000})
    req = GenerationRequest(prompt="x", seed=1, enable_base64_output=True)

    def job(path: str) -> UpstreamJob:
        return UpstreamJob("u", JobStatus.COMPLETED,
                           outputs=[f"{p['base']}{path}?{i}" for i in range(p["images"])])

    await outputs.normalize(provider, req, job("/small.png"))  # warm-up: imports, pools
    await outputs.normalize(provider, req, job("/pixels"))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:  # noqa: ASYNC230 - procfs, instant
        refs.write("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    started = time.monotonic()
    results = await asyncio.gather(*(outputs.normalize(provider, req, job(p["path"]))
                                     for _ in range(p["requests"])), return_exceptions=True)
    # gather() does not stop the other outputs of a failed request: let them finish.
    for _ in range(400):
        if len(asyncio.all_tasks()) <= 1:
            break
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    peak = _status("VmHWM")
    errors = [r.message for r in results if isinstance(r, ProviderError)]
    unexpected = [repr(r) for r in results
                  if isinstance(r, BaseException) and not isinstance(r, ProviderError)]
    await provider.aclose()
    return {"base": base, "peak": peak, "growth": peak - base, "elapsed": elapsed,
            "completed": sum(isinstance(r, tuple) for r in results),
            "failed": len(errors), "errors": errors, "unexpected": unexpected,
            "in_use_after": [budget_mod.downloads().in_use, budget_mod.decoding().in_use]
            if configure is not None else [0, 0]}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_probe(json.loads(sys.argv[1])))))
