"""Request ids, the proxy-overhead header and histogram, and the log context: every
response of every route and surface carries `x-request-id` and
`x-flux-proxy-overhead-ms`; every line logged for a request (and for the prediction it
submitted) carries its request id, and prediction lines its id, key name, provider and
attempt."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from PIL import Image

from providers.simulators import SimConfig, SimulatorServer
from proxy import metrics
from proxy.api.request_context import (
    RequestContext,
    prediction_surface,
    upstream_seconds,
    waited_on,
)
from proxy.app import create_app

from .conftest import make_settings, metric_value, running_proxy

ADMIN = "request-context-admin"
UPSTREAM_KEY = "ws-upstream-key-93ab51"
HEX32 = re.compile(r"[0-9a-f]{32}")
SUBMIT = {"prompt": "a lighthouse", "size": "512*512"}
WAVESPEED = "/api/v3/wavespeed-ai/flux-dev"
VIBEDREAM = "/api/v1/models/flux-dev/generate"
OPENAI = "/v1/images/generations"


def _png_base64() -> str:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 60, 30)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


PNG_B64 = _png_base64()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def overhead_ms(r: httpx.Response) -> float:
    value = r.headers["x-flux-proxy-overhead-ms"]
    assert re.fullmatch(r"\d+\.\d\d", value), value
    return float(value)


def overhead_count(page: str, surface: str, mode: str) -> float:
    return metric_value(page, "flux_proxy_overhead_seconds_count", surface=surface, mode=mode)


async def new_key(c: AsyncTestClient[Any], name: str) -> dict[str, str]:
    r = await c.post("/admin/keys", json={"name": name}, headers=bearer(ADMIN))
    assert r.status_code == 201, r.text
    return bearer(r.json()["key"])


@pytest.fixture
def two_sims() -> Any:
    with SimulatorServer("wavespeed", SimConfig(job_latency_s=0.05)) as ws, \
            SimulatorServer("vibedream", SimConfig(job_latency_s=0.05)) as vd:
        yield {"wavespeed": ws, "vibedream": vd}


# --------------------------------------------------------------------------- request ids


async def test_request_id_echoed_when_sane_else_generated_on_every_route_and_surface(
    tmp_path: Path, two_sims: dict[str, SimulatorServer]
) -> None:
    settings = make_settings(tmp_path, two_sims, auth_enabled=True, admin_key=ADMIN,
                             log_level="warning")
    async with running_proxy(settings) as c:
        sane = "Trace-01.a_b:c/d+e=f-" + "x" * 100  # 121 characters of the allowed set
        r = await c.get("/healthz", headers={"x-request-id": sane})
        assert r.headers["x-request-id"] == sane
        overhead_ms(r)
        for insane in ("y" * 129, "two words", "a;b", "<script>", ""):
            r = await c.get("/healthz", headers={"x-request-id": insane})
            assert HEX32.fullmatch(r.headers["x-request-id"]), (insane, r.headers)
        first, second = (await c.get("/healthz")), (await c.get("/healthz"))
        assert HEX32.fullmatch(first.headers["x-request-id"])
        assert first.headers["x-request-id"] != second.headers["x-request-id"]

        key = await new_key(c, "ids")
        calls: list[tuple[str, str, dict[str, Any] | None, dict[str, str] | None, int]] = [
            ("GET", "/nowhere", None, None, 404),
            ("GET", "/v1/predictions/nope", None, key, 404),
            ("POST", "/v1/predictions", SUBMIT, None, 401),  # the guard's 401
            ("POST", "/v1/predictions", {"prompt": 3}, key, 422),
            ("DELETE", "/v1/models", None, key, 405),
            ("POST", "/v1/predictions", SUBMIT, key, 202),
            ("POST", OPENAI, {"prompt": "a lighthouse", "size": "512x512"}, key, 200),
            ("POST", OPENAI, {"prompt": "a lighthouse"}, None, 401),
            ("GET", "/v1/images/nothing", None, key, 404),
            ("POST", WAVESPEED, {"prompt": "a lighthouse", "size": "512*512"}, key, 200),
            ("POST", WAVESPEED, {"prompt": "a lighthouse"}, None, 401),
            ("GET", "/api/v3/predictions/nope/result", None, key, 404),
            ("POST", VIBEDREAM, {"prompt": "a lighthouse", "size": "512*512"}, key, 200),
            ("POST", VIBEDREAM, {"prompt": "a lighthouse"}, None, 401),
            ("GET", "/api/v1/predictions/nope", None, key, 404),
            ("GET", "/metrics", None, None, 200),
        ]
        for i, (method, path, body, headers, status) in enumerate(calls):
            rid = f"req-{i}"
            r = await c.request(method, path, json=body,
                                headers={**(headers or {}), "X-Request-ID": rid})
            assert r.status_code == status, (method, path, r.status_code, r.text)
            assert r.headers["x-request-id"] == rid, (method, path, r.headers)
            assert overhead_ms(r) >= 0
            r = await c.request(method, path, json=body, headers=headers)
            assert HEX32.fullmatch(r.headers.get("x-request-id", "")), (method, path)


# --------------------------------------------------------------------------- overhead


def test_upstream_time_is_the_union_of_attempts_clipped_to_the_window() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def at(s: float) -> datetime:
        return t0 + timedelta(seconds=s)

    def attempt(start: float, end: float | None) -> Any:
        return SimpleNamespace(created_at=at(start), completed_at=None if end is None else at(end))

    # A hedge overlapping the first attempt counts once; a gap between attempts not at all.
    spans = [attempt(1, 3), attempt(2, 4), attempt(6, 7)]
    assert upstream_seconds(spans, at(0), at(10)) == pytest.approx(4.0)
    # Clipped to the request's window; an attempt still open runs until its end.
    assert upstream_seconds(spans, at(2.5), at(6.5)) == pytest.approx(2.0)
    assert upstream_seconds([attempt(1, None)], at(0), at(5)) == pytest.approx(4.0)
    assert upstream_seconds([], at(0), at(5)) == 0.0
    naive = SimpleNamespace(created_at=at(1).replace(tzinfo=None),
                            completed_at=at(2).replace(tzinfo=None))  # as SQLite reads back
    assert upstream_seconds([naive], at(0), at(5)) == pytest.approx(1.0)


async def _call(app: Any, method: str, path: str) -> tuple[dict[str, str], float]:
    """One request through `app`; its response headers and the wall time it took."""
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    start = time.perf_counter()
    await app(scope, receive, send)
    wall = time.perf_counter() - start
    return {k.decode(): v.decode() for k, v in sent[0]["headers"]}, wall


def _histogram_count(surface: str, mode: str) -> float:
    for sample in metrics.PROXY_OVERHEAD.collect()[0].samples:
        if sample.name.endswith("_count") and sample.labels == {"surface": surface,
                                                                 "mode": mode}:
            return float(sample.value)
    return 0.0


async def test_overhead_is_wall_time_less_the_upstream_time_the_request_waited_on() -> None:
    """The definition, on an app with known timings: 0.1 s of proxy work, a 0.2 s
    attempt the handler waits on, 0.05 s more: overhead 0.15 s; not waited on: all."""

    def app_that(wait: bool) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await asyncio.sleep(0.1)
            began = datetime.now(UTC)
            await asyncio.sleep(0.2)
            ended = datetime.now(UTC)
            if wait:
                waited_on(SimpleNamespace(  # type: ignore[arg-type]
                    pred=SimpleNamespace(completed_at=ended),
                    attempts=[SimpleNamespace(created_at=began, completed_at=ended)]))
            await asyncio.sleep(0.05)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
        return app

    before = _histogram_count("native", "sync"), _histogram_count("native", "async")
    headers, wall = await _call(RequestContext(app_that(True)), "POST", "/v1/predictions")
    waited = float(headers["x-flux-proxy-overhead-ms"]) / 1000
    assert 0.145 <= waited <= wall - 0.195, (waited, wall)
    headers, wall = await _call(RequestContext(app_that(False)), "POST", "/v1/predictions")
    not_waited = float(headers["x-flux-proxy-overhead-ms"]) / 1000
    assert 0.345 <= not_waited <= wall + 0.001, (not_waited, wall)
    assert (_histogram_count("native", "sync"), _histogram_count("native", "async")) == (
        before[0] + 1, before[1] + 1)
    # Reads are not prediction requests: their overhead is in the header only.
    headers, _ = await _call(RequestContext(app_that(False)), "GET", "/v1/predictions")
    assert "x-flux-proxy-overhead-ms" in headers
    assert _histogram_count("native", "async") == before[1] + 1


def test_only_the_routes_that_submit_a_prediction_have_a_surface() -> None:
    assert prediction_surface("POST", "/v1/predictions") == "native"
    assert prediction_surface("POST", "/v1/images/generations") == "openai"
    assert prediction_surface("POST", "/v1/images/edits") == "openai"
    assert prediction_surface("POST", WAVESPEED) == "wavespeed"
    assert prediction_surface("POST", VIBEDREAM) == "vibedream"
    for method, path in (("GET", "/v1/predictions"), ("POST", "/v1/predictions/x/cancel"),
                         ("POST", "/api/v3/media/upload/binary"),
                         ("POST", "/api/v3/predictions/x/result"), ("GET", WAVESPEED),
                         ("POST", "/admin/keys"), ("GET", "/healthz"), ("GET", "/metrics")):
        assert prediction_surface(method, path) is None, (method, path)


async def test_overhead_header_and_histogram_on_real_predictions(tmp_path: Path) -> None:
    """A sync prediction that spends 0.3 s upstream: its overhead is the proxy's few
    milliseconds, not the 0.3 s. An async one: its overhead is its whole (short) time.
    The histogram gets one sample per prediction request, by surface and mode."""
    with SimulatorServer("wavespeed", SimConfig(job_latency_s=0.3)) as ws, \
            SimulatorServer("vibedream", SimConfig(job_latency_s=0.3)) as vd:
        settings = make_settings(tmp_path, {"wavespeed": ws, "vibedream": vd},
                                 log_level="warning")
        async with running_proxy(settings) as c:
            page = (await c.get("/metrics")).text
            counts = {(s, m): overhead_count(page, s, m)
                      for s in metrics.SURFACES for m in ("sync", "async")}

            start = time.perf_counter()
            r = await c.post("/v1/predictions", json={**SUBMIT, "enable_sync_mode": True})
            wall_ms = (time.perf_counter() - start) * 1000
            assert r.status_code == 200 and r.json()["status"] == "completed", r.text
            assert wall_ms >= 300
            assert overhead_ms(r) < wall_ms - 250, (overhead_ms(r), wall_ms)

            start = time.perf_counter()
            r = await c.post("/v1/predictions", json=SUBMIT)
            wall_ms = (time.perf_counter() - start) * 1000
            assert r.status_code == 202, r.text
            assert 0 < overhead_ms(r) <= wall_ms + 1, (overhead_ms(r), wall_ms)
            pid = r.json()["id"]

            r = await c.post(OPENAI, json={"prompt": "a lighthouse", "size": "512x512"})
            assert r.status_code == 200 and overhead_ms(r) < 250, r.text
            r = await c.post(WAVESPEED, json={"prompt": "a lighthouse", "size": "512*512"})
            assert r.status_code == 200, r.text
            r = await c.post(VIBEDREAM, json={"prompt": "a lighthouse", "size": "512*512"})
            assert r.status_code == 200, r.text
            # Neither reads, nor refusals, nor /metrics are prediction requests.
            await c.get(f"/v1/predictions/{pid}")
            await c.post("/v1/predictions", json={"prompt": 3})
            await c.get("/healthz")

            page = (await c.get("/metrics")).text
            grew = {k: overhead_count(page, *k) - v for k, v in counts.items()}
            assert {k: v for k, v in grew.items() if v} == {
                ("native", "sync"): 1, ("native", "async"): 1, ("openai", "sync"): 1,
                ("wavespeed", "async"): 1, ("vibedream", "async"): 1}


# --------------------------------------------------------------------------- log context


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_every_line_of_a_request_and_its_prediction_carries_the_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sync prediction that fails over (WaveSpeed answers 500, VibeDream serves it):
    every line about it carries the request's id, the prediction id and the key name;
    the attempt lines (the upstream error's too) the provider and attempt number."""
    with SimulatorServer("wavespeed", SimConfig(job_latency_s=0.05, error_rate=1.0)) as ws, \
            SimulatorServer("vibedream", SimConfig(job_latency_s=0.05)) as vd:
        settings = make_settings(tmp_path, {"wavespeed": ws, "vibedream": vd},
                                 auth_enabled=True, admin_key=ADMIN)
        async with running_proxy(settings) as c:
            key = await new_key(c, "marketing-app")
            r = await c.post("/v1/predictions", json={**SUBMIT, "enable_sync_mode": True},
                             headers={**key, "x-request-id": "trace-42"})
            assert r.status_code == 200 and r.json()["status"] == "completed", r.text
            assert r.headers["x-request-id"] == "trace-42"
            pid = r.json()["id"]
            other = await c.get("/healthz")  # the next request: its own id, no leftovers
            assert other.headers["x-request-id"] != "trace-42"
    events = _events(capsys.readouterr().out)
    mine = [e for e in events if e.get("request_id") == "trace-42"]
    names = [e["event"] for e in mine]
    assert names[0] == "prediction.queued" and names[-1] == "prediction.finished", names
    assert {"attempt.submitting", "upstream.error", "attempt.finished",
            "prediction.failover", "attempt.accepted"} <= set(names), names
    for e in mine:
        assert e["prediction_id"] == pid and e["key_name"] == "marketing-app", e
    about = [e for e in events if e.get("prediction_id") == pid]
    assert about == mine  # no line about the prediction lacks the request id
    for e in mine:
        if e["event"].startswith(("attempt.", "upstream.")):
            assert (e["provider"], e["attempt"]) in (("wavespeed", 1), ("vibedream", 2)), e
    error = next(e for e in mine if e["event"] == "upstream.error")
    assert (error["provider"], error["attempt"], error["operation"]) == ("wavespeed", 1,
                                                                         "submit")
    assert error["error_class"] == "UpstreamUnavailable" and error["http_status"] == 500
    assert error["level"] == "warning"
    assert not [e for e in events if e.get("request_id") == other.headers["x-request-id"]
                and "prediction_id" in e]


async def test_an_upstream_error_line_has_class_and_status_never_keys_or_image_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The upstream answers 400 with a body that quotes our key, the Authorization
    header and an inline image back: the line says what failed, not what was sent."""

    def upstream(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        return httpx.Response(400, json={"message": (
            f"bad request from Authorization: Bearer {UPSTREAM_KEY} (key {UPSTREAM_KEY}) "
            f"with image data:image/png;base64,{PNG_B64}")})

    with SimulatorServer("wavespeed", SimConfig()) as ws:
        settings = make_settings(tmp_path, {"wavespeed": ws},
                                 provider_extra={"wavespeed": {"api_key": UPSTREAM_KEY}})
        app = create_app(settings, transports={"wavespeed": httpx.MockTransport(upstream)})
        async with AsyncTestClient(app, base_url="http://proxy.test") as c:
            r = await c.post("/v1/predictions", json={
                **SUBMIT, "enable_sync_mode": True,
                "image": f"data:image/png;base64,{PNG_B64}"})
            assert r.json()["status"] == "failed", r.text
            rid = r.headers["x-request-id"]
    text = capsys.readouterr().out
    assert UPSTREAM_KEY not in text and PNG_B64 not in text and PNG_B64[:40] not in text
    assert not re.search(r"(?i)bearer (?!\[REDACTED\]|\*\*\*)", text)  # no token follows
    error = next(e for e in _events(text) if e["event"] == "upstream.error")
    assert error["error_class"] == "InvalidInput" and error["http_status"] == 400
    assert error["error_kind"] == "invalid_input" and error["operation"] == "submit"
    assert error["provider"] == "wavespeed" and error["request_id"] == rid
    assert "authorization" not in {k.lower() for k in error}


# --------------------------------------------------------------------------- start-up line


def test_serve_on_port_0_logs_the_port_actually_bound(tmp_path: Path) -> None:
    """`flux-proxy serve --port 0`: one `serve.listening` line (JSON: stdout is a pipe)
    with the port the kernel chose, which answers."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_", "LOCAL_WORKER",
                                "PROMETHEUS_MULTIPROC"))}
    env.update(FLUX_PROXY_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
               FLUX_PROXY_INSTANCE_ID="port-zero")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--port", "0"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        listening: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while not listening:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no serve.listening:\n" + log.read_text()
            time.sleep(0.1)
            listening = [e for e in _events(log.read_text())
                         if e.get("event") == "serve.listening"]
        line = listening[0]
        assert line["host"] == "127.0.0.1" and line["port"] > 0 and line["workers"] == 1
        assert line["url"] == f"http://127.0.0.1:{line['port']}"
        r = httpx.get(f"{line['url']}/healthz", timeout=5)
        assert r.status_code == 200 and HEX32.fullmatch(r.headers["x-request-id"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert len([e for e in _events(log.read_text())
                if e.get("event") == "serve.listening"]) == 1
