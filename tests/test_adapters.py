"""Contract tests of the VibeDream and WaveSpeed adapters.

Against the simulators over real loopback HTTP; an `httpx.MockTransport` only
for wire shapes the simulators never produce (foreign statusUrl, echoed keys,
HTTP-date Retry-After, missing costCents).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from PIL import Image

from common.media import OutboundGuard
from providers.base import (
    AuthFailed,
    ConfigurationError,
    ErrorKind,
    GenerationRequest,
    InvalidInput,
    JobStatus,
    MalformedResponse,
    OutcomeUnknown,
    Provider,
    ProviderError,
    RateLimited,
    UpstreamJob,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from providers.registry import build_provider, settings_class
from providers.simulators import SimConfig, SimulatorServer
from providers.vibedream import VibeDreamProvider, VibeDreamSettings
from providers.wavespeed import WaveSpeedProvider, WaveSpeedSettings

KEY = "sk-live-TOPSECRET-0123456789"
WRONG_KEY = "sk-live-WRONGKEY-9876543210"
Factory = Callable[..., Any]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vd_server() -> Iterator[SimulatorServer]:
    with SimulatorServer("vibedream", SimConfig(api_key=KEY, job_latency_s=0.05)) as sim:
        yield sim


@pytest.fixture(scope="module")
def ws_server() -> Iterator[SimulatorServer]:
    with SimulatorServer("wavespeed", SimConfig(api_key=KEY, job_latency_s=0.05)) as sim:
        yield sim


@pytest.fixture
def vd_sim(vd_server: SimulatorServer) -> SimulatorServer:
    vd_server.reset()
    return vd_server


@pytest.fixture
def ws_sim(ws_server: SimulatorServer) -> SimulatorServer:
    ws_server.reset()
    return ws_server


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    """make(kind, base_url, **settings) -> provider; closed after the test."""
    made: list[Any] = []

    def factory(kind: str, base_url: str, **overrides: Any) -> Any:
        host = httpx.URL(base_url).host
        values: dict[str, Any] = {
            "base_url": base_url,
            "api_key": KEY,
            "asset_hosts": [host],
            "allow_private_asset_hosts": True,
            "connect_timeout_s": 1.0,
            "read_timeout_s": 2.0,
            "download_timeout_s": 2.0,
            **overrides,
        }
        transport = values.pop("transport", None)
        guard = values.pop("guard", None)
        provider = build_provider(kind, kind, values, transport=transport, guard=guard)
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        await provider.aclose()


def gen(prompt: str = "a red fox in the snow", **kw: Any) -> GenerationRequest:
    values: dict[str, Any] = {"seed": 42, "width": 512, "height": 512, **kw}
    return GenerationRequest(prompt=prompt, **values)


async def until_terminal(provider: Any, job: UpstreamJob, limit_s: float = 5.0) -> UpstreamJob:
    async with asyncio.timeout(limit_s):
        while not job.status.terminal:
            await asyncio.sleep(0.02)
            job = await provider.poll(job)
    return job


async def expect_error(kind: type[ProviderError], awaitable: Any) -> ProviderError:
    """Await, expecting `kind`; and check that no key leaks through the error."""
    with pytest.raises(kind) as info:
        await awaitable
    exc = info.value
    for text in (str(exc), repr(exc), str(exc.__cause__ or ""), repr(exc.__cause__ or "")):
        assert KEY not in text and WRONG_KEY not in text
    return exc


def image_of(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# --------------------------------------------------------------------------- happy paths


async def test_vibedream_submit_poll_download(vd_sim: SimulatorServer, make: Factory) -> None:
    vd = make("vibedream", vd_sim.base_url)
    req = gen(width=768, height=1024, num_images=2, output_format="png")
    job = await vd.submit(req)
    assert job.status is JobStatus.PROCESSING and job.poll_url
    assert job.charged_micro_usd == 2 * 2 * 10_000  # costCents 4
    done = await until_terminal(vd, job)
    assert done.status is JobStatus.COMPLETED and len(done.outputs) == 2
    assert done.has_nsfw_contents is None  # VibeDream does not say
    data, content_type = await vd.download(done.outputs[1])
    assert content_type == "image/png"
    assert image_of(data).size == (768, 1024) and image_of(data).format == "PNG"
    assert vd.attempt_cost_micro_usd(req, done) == 40_000


async def test_wavespeed_async_submit_poll(ws_sim: SimulatorServer, make: Factory) -> None:
    ws = make("wavespeed", ws_sim.base_url)
    req = gen(width=1536, height=256, output_format="webp")
    job = await ws.submit(req)
    assert job.status is JobStatus.PROCESSING and job.raw_status == "created"
    done = await until_terminal(ws, job)
    assert done.status is JobStatus.COMPLETED and done.has_nsfw_contents == [False]
    assert done.inference_ms is not None
    data, _ = await ws.download(done.outputs[0])
    assert image_of(data).size == (1536, 256) and image_of(data).format == "WEBP"
    assert ws.attempt_cost_micro_usd(req, done) == 12_000


async def test_wavespeed_sync_completes_in_the_submit(
    ws_sim: SimulatorServer, make: Factory
) -> None:
    ws = make("wavespeed", ws_sim.base_url, use_native_sync=True)
    job = await ws.submit(gen(enable_sync_mode=True, num_images=3))
    assert job.status is JobStatus.COMPLETED and len(job.outputs) == 3
    assert ws_sim.stats["submits"] == 1 and ws_sim.stats["polls"] == 0


async def test_wavespeed_sync_off_by_default(ws_sim: SimulatorServer, make: Factory) -> None:
    for ws in (make("wavespeed", ws_sim.base_url),
               make("wavespeed", ws_sim.base_url, use_native_sync=False)):
        job = await ws.submit(gen(enable_sync_mode=True))
        assert job.status is JobStatus.PROCESSING
        assert not ws.capabilities.native_sync


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_wavespeed_base64_outputs_are_data_uris(
    ws_sim: SimulatorServer, make: Factory, fmt: str
) -> None:
    ws = make("wavespeed", ws_sim.base_url, use_native_sync=True)
    req = gen(enable_sync_mode=True, enable_base64_output=True, output_format=fmt)
    job = await ws.submit(req)
    assert job.status is JobStatus.COMPLETED
    head, _, payload = job.outputs[0].partition(",")
    assert head == f"data:image/{fmt};base64"
    img = image_of(base64.b64decode(payload))
    assert img.format == fmt.upper() and img.size == (512, 512)


async def test_wavespeed_base64_via_poll(ws_sim: SimulatorServer, make: Factory) -> None:
    ws = make("wavespeed", ws_sim.base_url)
    job = await until_terminal(ws, await ws.submit(gen(enable_base64_output=True)))
    assert job.outputs[0].startswith("data:image/jpeg;base64,")


async def test_wavespeed_sync_give_up_5004_then_poll(
    ws_sim: SimulatorServer, make: Factory
) -> None:
    ws_sim.config.sync_give_up_s = 0.1
    ws = make("wavespeed", ws_sim.base_url, use_native_sync=True)
    job = await ws.submit(gen("[sim:latency=0.4] a fox", enable_sync_mode=True))
    assert job.status is JobStatus.PROCESSING and job.upstream_code == 5004
    done = await until_terminal(ws, job)
    assert done.status is JobStatus.COMPLETED
    assert ws_sim.stats["submits"] == 1


async def test_wavespeed_sync_bare_504_is_outcome_unknown(
    ws_sim: SimulatorServer, make: Factory
) -> None:
    ws_sim.config.sync_give_up_s = 0.1
    ws_sim.config.sync_timeout_mode = "504"
    ws = make("wavespeed", ws_sim.base_url, use_native_sync=True)
    req = gen("[sim:latency=1] a fox", enable_sync_mode=True)
    exc = await expect_error(OutcomeUnknown, ws.submit(req))
    assert exc.status_code == 504 and "<html" not in exc.message
    assert ws_sim.stats["submits"] == 1


# --------------------------------------------------------------------------- submit errors

KINDS = ["vibedream", "wavespeed"]


@pytest.fixture(params=KINDS)
def sim(request: pytest.FixtureRequest) -> SimulatorServer:
    server: SimulatorServer = request.getfixturevalue(
        "vd_sim" if request.param == "vibedream" else "ws_sim"
    )
    return server


async def test_bad_key_is_auth_failed(sim: SimulatorServer, make: Factory) -> None:
    p = make(sim.kind, sim.base_url, api_key=WRONG_KEY)
    exc = await expect_error(AuthFailed, p.submit(gen()))
    assert exc.status_code == 401 and exc.provider == sim.kind


async def test_429_is_rate_limited_with_retry_after(sim: SimulatorServer, make: Factory) -> None:
    sim.config.retry_after_s = 7
    exc = await expect_error(RateLimited, make(sim.kind, sim.base_url).submit(gen("[sim:429]")))
    assert exc.retry_after == 7.0 and exc.retryable


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_unavailable(sim: SimulatorServer, make: Factory, status: int) -> None:
    p = make(sim.kind, sim.base_url)
    exc = await expect_error(UpstreamUnavailable, p.submit(gen(f"[sim:{status}] x")))
    assert exc.status_code == status


async def test_504_on_async_submit_is_outcome_unknown(sim: SimulatorServer, make: Factory) -> None:
    await expect_error(OutcomeUnknown, make(sim.kind, sim.base_url).submit(gen("[sim:504]")))


async def test_400_is_invalid_input(sim: SimulatorServer, make: Factory) -> None:
    exc = await expect_error(InvalidInput, make(sim.kind, sim.base_url).submit(gen("[sim:400]")))
    assert not exc.retryable


@pytest.mark.parametrize("body", ["text", "shape"])
async def test_malformed_submit_is_outcome_unknown(
    sim: SimulatorServer, make: Factory, body: str
) -> None:
    # A 2xx answer we cannot read may still mean the task exists upstream.
    p = make(sim.kind, sim.base_url)
    await expect_error(OutcomeUnknown, p.submit(gen(f"[sim:malformed={body}]")))


async def test_submit_404_is_a_misconfigured_provider_not_bad_input(
    sim: SimulatorServer, make: Factory
) -> None:
    p = make(sim.kind, sim.base_url + "/wrong-prefix")
    err = await expect_error(UpstreamUnavailable, p.submit(gen()))
    assert err.retryable and "base_url" in err.message


async def test_dropped_submit_is_outcome_unknown(sim: SimulatorServer, make: Factory) -> None:
    await expect_error(OutcomeUnknown, make(sim.kind, sim.base_url).submit(gen("[sim:drop]")))


async def test_hung_submit_is_outcome_unknown(sim: SimulatorServer, make: Factory) -> None:
    p = make(sim.kind, sim.base_url, read_timeout_s=0.3)
    await expect_error(OutcomeUnknown, p.submit(gen("[sim:hang=5]")))


@pytest.mark.parametrize("kind", KINDS)
async def test_closed_port_is_unavailable(make: Factory, kind: str) -> None:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        p = make(kind, f"http://127.0.0.1:{sock.getsockname()[1]}")
        await expect_error(UpstreamUnavailable, p.submit(gen()))


# --------------------------------------------------------------------------- poll errors


async def test_poll_of_unknown_job_is_unavailable(sim: SimulatorServer, make: Factory) -> None:
    p = make(sim.kind, sim.base_url)
    ghost = UpstreamJob(upstream_id="no-such-job", status=JobStatus.PROCESSING)
    exc = await expect_error(UpstreamUnavailable, p.poll(ghost))
    assert "not found" in exc.message


async def test_poll_5xx_then_recovers(sim: SimulatorServer, make: Factory) -> None:
    p = make(sim.kind, sim.base_url)
    job = await p.submit(gen("[sim:poll-500=1] x"))
    await expect_error(UpstreamUnavailable, p.poll(job))
    assert (await until_terminal(p, job)).status is JobStatus.COMPLETED


async def test_poll_timeout_is_upstream_timeout(sim: SimulatorServer, make: Factory) -> None:
    p = make(sim.kind, sim.base_url, read_timeout_s=0.2)
    job = await p.submit(gen())
    sim.config.poll_latency_s = 1.0
    await expect_error(UpstreamTimeout, p.poll(job))


# --------------------------------------------------------------------------- job failures


async def test_moderation_is_a_policy_failure(sim: SimulatorServer, make: Factory) -> None:
    p = make(sim.kind, sim.base_url)
    job = await until_terminal(p, await p.submit(gen("[sim:moderate] x")))
    assert job.status is JobStatus.FAILED and job.error_kind is ErrorKind.POLICY
    assert job.error and "moderation" in job.error


async def test_fail_after_accept_is_unavailable(sim: SimulatorServer, make: Factory) -> None:
    p = make(sim.kind, sim.base_url)
    job = await until_terminal(p, await p.submit(gen("[sim:fail-after-accept] x")))
    assert job.status is JobStatus.FAILED and job.error_kind is ErrorKind.UNAVAILABLE


@pytest.mark.parametrize(
    ("directive", "status", "kind"),
    [
        ("[sim:code=1402]", JobStatus.FAILED, ErrorKind.INVALID_INPUT),
        ("[sim:code=1400]", JobStatus.FAILED, ErrorKind.INVALID_INPUT),
        ("[sim:code=5003]", JobStatus.FAILED, ErrorKind.UNAVAILABLE),
        ("[sim:code=4242]", JobStatus.FAILED, ErrorKind.UNAVAILABLE),
        ("[sim:status=timeout]", JobStatus.FAILED, ErrorKind.TIMEOUT),
        ("[sim:status=deleted]", JobStatus.FAILED, ErrorKind.UNAVAILABLE),
        ("[sim:status=cancelled]", JobStatus.CANCELED, None),
    ],
)
async def test_wavespeed_failure_codes(
    ws_sim: SimulatorServer, make: Factory, directive: str, status: JobStatus, kind: Any
) -> None:
    ws = make("wavespeed", ws_sim.base_url)
    job = await until_terminal(ws, await ws.submit(gen(f"{directive} x")))
    assert (job.status, job.error_kind) == (status, kind)


async def test_wavespeed_nsfw_flags(ws_sim: SimulatorServer, make: Factory) -> None:
    ws = make("wavespeed", ws_sim.base_url)
    job = await until_terminal(ws, await ws.submit(gen("[sim:nsfw=1] x", num_images=3)))
    assert job.status is JobStatus.COMPLETED and job.has_nsfw_contents == [False, True, False]


# --------------------------------------------------------------------------- capabilities


def test_vibedream_capabilities() -> None:
    caps = VibeDreamProvider.capabilities
    assert caps.unsupported_reason(gen(width=1024, height=768)) is None
    assert "1536*1536" in (caps.unsupported_reason(gen(width=1536, height=1536)) or "")
    data_uri = gen(image="data:image/png;base64,iVBORw0KGgo=")
    assert "public" in (caps.unsupported_reason(data_uri) or "")
    assert caps.unsupported_reason(gen(num_images=5)) is not None
    assert not (caps.native_sync or caps.native_base64 or caps.native_nsfw_flags or caps.cancel)


def test_wavespeed_capabilities() -> None:
    caps = WaveSpeedProvider.capabilities
    assert caps.unsupported_reason(gen(width=1536, height=256)) is None
    assert caps.unsupported_reason(gen(image="data:image/png;base64,AAAA")) is None
    assert caps.unsupported_reason(gen(width=1600, height=512)) is not None
    assert caps.native_sync and caps.native_base64 and caps.native_nsfw_flags


# --------------------------------------------------------------------------- costs


def test_vibedream_costs() -> None:
    req = gen(num_images=3)
    vd = VibeDreamProvider("vd", VibeDreamSettings())
    quoted = UpstreamJob("j", JobStatus.COMPLETED, charged_micro_usd=50_000)
    failed = UpstreamJob("j", JobStatus.FAILED, charged_micro_usd=50_000)
    assert vd.attempt_cost_micro_usd(req, quoted) == 50_000
    assert vd.attempt_cost_micro_usd(req, failed) == 50_000  # no refunds assumed
    assert vd.attempt_cost_micro_usd(req, None) == 3 * 2 * 10_000  # outcome unknown
    unquoted = UpstreamJob("j", JobStatus.COMPLETED)
    assert vd.attempt_cost_micro_usd(req, unquoted) == 60_000
    refunding = VibeDreamProvider("vd", VibeDreamSettings(refunds_failed=True))
    assert refunding.attempt_cost_micro_usd(req, failed) == 0


def test_wavespeed_costs() -> None:
    req = gen(num_images=2)
    ws = WaveSpeedProvider("ws", WaveSpeedSettings())
    done = UpstreamJob("j", JobStatus.COMPLETED, outputs=["https://x/1.jpg", "https://x/2.jpg"])
    failed = UpstreamJob("j", JobStatus.FAILED, error_kind=ErrorKind.UNAVAILABLE)
    assert ws.attempt_cost_micro_usd(req, done) == 24_000
    assert ws.attempt_cost_micro_usd(req, failed) == 0  # refunded
    assert ws.attempt_cost_micro_usd(req, None) == 24_000  # outcome unknown
    strict = WaveSpeedProvider("ws", WaveSpeedSettings(refunds_failed=False))
    assert strict.attempt_cost_micro_usd(req, failed) == 24_000


# --------------------------------------------------------------------------- downloads


async def test_download_refuses_hosts_outside_asset_hosts(
    vd_sim: SimulatorServer, make: Factory
) -> None:
    vd = make("vibedream", vd_sim.base_url, asset_hosts=["assets.vibedream.ai"])
    done = await until_terminal(vd, await vd.submit(gen()))
    # Our setting refused it, not the upstream: the error says which setting to change.
    exc = await expect_error(ConfigurationError, vd.download(done.outputs[0]))
    assert "providers.vibedream.asset_hosts" in exc.message
    assert vd_sim.stats["asset_gets"] == 0


async def test_download_refuses_loopback_unless_allowed(
    vd_sim: SimulatorServer, make: Factory
) -> None:
    vd = make("vibedream", vd_sim.base_url, allow_private_asset_hosts=False)
    done = await until_terminal(vd, await vd.submit(gen()))
    exc = await expect_error(ConfigurationError, vd.download(done.outputs[0]))
    assert "allow_private_asset_hosts" in exc.message
    assert vd_sim.stats["asset_gets"] == 0


async def test_download_never_sends_the_key(make: Factory) -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, content=b"\x89PNG\r\n\x1a\n", headers={"content-type": "x"})

    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]

    vd = make(
        "vibedream",
        "https://api.vibedream.ai",
        asset_hosts=["assets.vibedream.ai"],
        allow_private_asset_hosts=False,
        transport=httpx.MockTransport(handler),
        guard=OutboundGuard(resolver=resolve),
    )
    data, _ = await vd.download("https://assets.vibedream.ai/outputs/a/0.png")
    assert data.startswith(b"\x89PNG") and len(seen) == 1
    assert "authorization" not in seen[0].headers


# --------------------------------------------------------------------------- wire shapes by mock


def mock(
    routes: Callable[[httpx.Request], httpx.Response],
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return routes(req)

    return httpx.MockTransport(handler), seen


async def test_vibedream_never_polls_a_foreign_status_url(make: Factory) -> None:
    def routes(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            evil = "https://evil.example.net/api/v1/predictions/abc"
            return httpx.Response(
                200, json={"id": "abc", "status": "processing", "statusUrl": evil}
            )
        return httpx.Response(200, json={"id": "abc", "status": "processing"})

    transport, seen = mock(routes)
    vd = make("vibedream", "https://api.vibedream.ai", transport=transport)
    job = await vd.submit(gen())
    assert job.poll_url == "https://api.vibedream.ai/api/v1/predictions/abc"
    assert job.charged_micro_usd is None  # no costCents: the cost falls back
    await vd.poll(job)
    assert [r.url.host for r in seen] == ["api.vibedream.ai", "api.vibedream.ai"]


async def test_wavespeed_never_polls_a_foreign_get_url(make: Factory) -> None:
    def routes(req: httpx.Request) -> httpx.Response:
        data = {"id": "t/1", "status": "created", "urls": {"get": "http://169.254.169.254/x"}}
        return httpx.Response(200, json={"code": 200, "message": "success", "data": data})

    transport, seen = mock(routes)
    ws = make("wavespeed", "https://api.wavespeed.ai", transport=transport)
    job = await ws.poll(await ws.submit(gen()))
    assert job.poll_url == "https://api.wavespeed.ai/api/v3/predictions/t%2F1/result"
    assert seen[-1].url.raw_path == b"/api/v3/predictions/t%2F1/result"


@pytest.mark.parametrize(
    ("cost", "charged"), [(2, 20_000), (2.5, 25_000), ("3", 30_000), (-1, None), ("x", None)]
)
async def test_vibedream_cost_cents_parsing(make: Factory, cost: Any, charged: Any) -> None:
    def routes(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            return httpx.Response(200, json={"id": "a", "costCents": cost, "statusUrl": 7})
        return httpx.Response(200, json={"id": "someone-else", "status": "completed"})

    vd = make("vibedream", "https://api.vibedream.ai", transport=mock(routes)[0])
    job = await vd.submit(gen())  # a garbled extra field never loses an accepted task
    assert job.upstream_id == "a" and job.charged_micro_usd == charged
    await expect_error(MalformedResponse, vd.poll(job))  # another job's answer


async def test_echoed_key_is_scrubbed_and_long_bodies_truncated(make: Factory) -> None:
    def routes(req: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": f"bad key {KEY} " + "x" * 5000})

    transport, _ = mock(routes)
    vd = make("vibedream", "https://api.vibedream.ai", transport=transport)
    exc = await expect_error(InvalidInput, vd.submit(gen()))
    assert "***" in exc.message and len(exc.message) < 300


async def test_retry_after_http_date(make: Factory) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)

    def routes(req: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": when}, json={"error": "slow down"})

    transport, _ = mock(routes)
    vd = make("vibedream", "https://api.vibedream.ai", transport=transport)
    exc = await expect_error(RateLimited, vd.submit(gen()))
    assert exc.retry_after is not None and 25 <= exc.retry_after <= 31


async def test_wavespeed_envelope_code_maps_like_http(make: Factory) -> None:
    def routes(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"code": 401, "message": "invalid token", "data": None})

    transport, _ = mock(routes)
    ws = make("wavespeed", "https://api.wavespeed.ai", transport=transport)
    exc = await expect_error(AuthFailed, ws.submit(gen()))
    assert exc.status_code == 401


async def test_submit_bodies_follow_the_seeds(make: Factory) -> None:
    bodies: list[dict[str, Any]] = []

    def routes(req: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(req.content))
        if req.url.host == "api.vibedream.ai":
            return httpx.Response(200, json={"id": "a", "status": "processing", "costCents": 2})
        data = {"id": "b", "status": "created"}
        return httpx.Response(200, json={"code": 200, "message": "success", "data": data})

    transport, seen = mock(routes)
    req = gen(image="https://img.example/a.png", mask_image="https://img.example/m.png")
    await make("vibedream", "https://api.vibedream.ai", transport=transport).submit(req)
    await make("wavespeed", "https://api.wavespeed.ai", transport=transport).submit(req)
    common = {"prompt", "image", "mask_image", "strength", "size", "seed", "output_format"}
    common |= {"num_inference_steps", "guidance_scale", "num_images"}
    assert set(bodies[0]) == common and bodies[0]["size"] == "512*512"
    ws_only = {"enable_base64_output", "enable_safety_checker", "enable_sync_mode"}
    assert set(bodies[1]) == common | ws_only
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in seen)
    text_only = gen()
    await make("vibedream", "https://api.vibedream.ai", transport=transport).submit(text_only)
    assert "image" not in bodies[2] and "strength" not in bodies[2]


# --------------------------------------------------------------------------- registry


async def test_registry_builds_providers() -> None:
    assert settings_class("vibedream") is VibeDreamSettings
    assert settings_class("wavespeed") is WaveSpeedSettings
    p = build_provider("ws-eu", "wavespeed", {"api_key": "k", "use_native_sync": False})
    try:
        assert isinstance(p, WaveSpeedProvider) and isinstance(p, Provider)
        assert p.name == "ws-eu" and p.settings.base_url == "https://api.wavespeed.ai"
    finally:
        await p.aclose()
    with pytest.raises(KeyError, match="unknown provider kind"):
        settings_class("nope")


def test_registry_imports_adapters_lazily() -> None:
    code = (
        "import sys, providers.registry as r; "
        "assert 'providers.wavespeed' not in sys.modules; "
        "r.settings_class('vibedream'); "
        "assert 'providers.vibedream' in sys.modules and 'providers.wavespeed' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)

