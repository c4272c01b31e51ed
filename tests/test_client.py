"""The flux_proxy client (sync and async) against a real proxy under uvicorn on
loopback, routed to the WaveSpeed simulator: generate + save, the sync-mode fallback
to polling, every typed exception, list pages, cancel, spend, and the
Idempotency-Key a retried submit reuses (so a lost answer never makes two)."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

import flux_proxy as fp
from flux_proxy import AsyncFluxProxy, FluxProxy
from flux_proxy._outputs import auth_headers
from providers.simulators import SimConfig, SimulatorServer
from tests._serve import create_key, serving
from tests.conftest import isolate_env, make_settings

ADMIN = "client-test-admin"


@dataclass
class Proxy:
    url: str
    sim: SimulatorServer
    key: str  # a plain client key (no budget, no rate limit)

    def make_key(self, name: str, **spec: Any) -> str:
        return create_key(self.url, ADMIN, name, **spec)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One proxy for the module: auth on, a short sync wait (slow jobs fall back to
    polling), outputs kept by the proxy itself only where a test asks (see below)."""
    tmp = tmp_path_factory.mktemp("client")
    with pytest.MonkeyPatch.context() as mp:
        isolate_env(mp)
        with SimulatorServer("wavespeed", SimConfig(job_latency_s=0.05)) as sim:
            settings = make_settings(tmp, {"wavespeed": sim}, auth_enabled=True,
                                     admin_key=ADMIN, public_base_url="",
                                     sync_timeout_s=0.5)
            with serving(settings) as url:
                proxy = Proxy(url, sim, "")
                proxy.key = proxy.make_key("plain")
                yield proxy


def png(width: int = 64, height: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


class Recording(httpx.HTTPTransport):
    """A real transport that keeps (method, path, status, request headers); with
    `drop_first_post`, the first POST reaches the proxy but its answer is lost."""

    def __init__(self, drop_first_post: bool = False) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, int | None, httpx.Headers]] = []
        self.drop = drop_first_post

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        response.read()
        if self.drop and request.method == "POST":
            self.drop = False
            self.seen.append((request.method, request.url.path, None, request.headers))
            raise httpx.ReadError("connection reset after the request was sent")
        self.seen.append((request.method, request.url.path, response.status_code,
                          request.headers))
        return response


def test_generate_completes_in_sync_mode_and_saves(proxy: Proxy, tmp_path: Path) -> None:
    rec = Recording()
    with FluxProxy(proxy.url, proxy.key, transport=rec) as client:
        pred = client.generate("a red fox", size="512*512", num_images=2, seed=42)
        assert isinstance(pred, fp.Prediction) and pred.completed and pred.seed == 42
        assert pred.provider == "wavespeed" and len(pred.outputs) == 2
        assert pred.cost_micro_usd == 24_000 and str(pred.cost_usd) == "0.024000"
        assert pred.attempts[0].provider == "wavespeed" and pred.created_at is not None
        paths = pred.save(tmp_path / "out")
    assert [p.stem for p in paths] == [f"{pred.id}-0", f"{pred.id}-1"]
    for p in paths:
        assert Image.open(p).size == (512, 512)
        assert p.suffix == "." + {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[
            str(Image.open(p).format)]
    # One sync POST answered 200, then the image downloads: no polling was needed.
    assert [(m, s) for m, path, s, _ in rec.seen if path.startswith("/v1")] == [("POST", 200)]
    post_headers = rec.seen[0][3]
    assert post_headers["Idempotency-Key"] and post_headers["Authorization"].endswith(proxy.key)
    # The simulator's asset URLs are another origin: the key is not sent there.
    downloads = [h for m, path, _s, h in rec.seen if m == "GET"]
    assert downloads and all("Authorization" not in h for h in downloads)


def test_a_slow_job_falls_back_from_sync_mode_to_polling(proxy: Proxy) -> None:
    rec = Recording()
    updates: list[str] = []
    with FluxProxy(proxy.url, proxy.key, transport=rec, poll_interval=0.05) as client:
        pred = client.generate("[sim:latency=1.5] a slow fox", timeout=20,
                               on_update=lambda p: updates.append(p.status))
    assert pred.completed
    calls = [(m, s) for m, path, s, _ in rec.seen if path.startswith("/v1")]
    assert calls[0] == ("POST", 202)  # still running after sync_timeout_s (0.5 s)
    assert len(calls) >= 2 and all(c == ("GET", 200) for c in calls[1:])
    assert updates[-1] == "completed"


def test_wait_gives_up_at_its_timeout_with_the_last_state(proxy: Proxy) -> None:
    with FluxProxy(proxy.url, proxy.key, poll_interval=0.05) as client:
        pred = client.submit("[sim:latency=5] patient")
        with pytest.raises(fp.WaitTimeout) as caught:
            client.wait(pred.id, timeout=0.3)
        assert caught.value.prediction is not None and not caught.value.prediction.done
        client.cancel(pred)


def test_a_retried_submit_reuses_its_idempotency_key(proxy: Proxy) -> None:
    key = proxy.make_key("idem")
    rec = Recording(drop_first_post=True)
    with FluxProxy(proxy.url, key, transport=rec) as client:
        pred = client.generate("a fox, answer lost once")
        assert pred.completed
        posts = [h["Idempotency-Key"] for m, _p, _s, h in rec.seen if m == "POST"]
        assert len(posts) == 2 and posts[0] == posts[1]  # the same key on the retry
        assert [p.id for p in client.list()] == [pred.id]  # one prediction, not two


def test_typed_errors(proxy: Proxy) -> None:
    with FluxProxy(proxy.url, proxy.key) as client:
        with pytest.raises(fp.ValidationError) as bad:
            client.submit("fox", size="99*99", num_images=9)
        assert bad.value.status == 422 and bad.value.code == "validation_error"
        assert {d.field for d in bad.value.details} == {"size", "num_images"}
        assert bad.value.details[0].allowed

        with pytest.raises(fp.PolicyRefused) as refused:
            client.generate("[sim:moderate] a fox")
        assert refused.value.prediction is not None
        assert refused.value.prediction.error_kind == "policy_refusal"

        with pytest.raises(fp.NotFound):
            client.get("no-such-prediction")

    with FluxProxy(proxy.url, "fpk_wrong") as client, pytest.raises(fp.AuthError) as auth:
        client.get("x")
    assert auth.value.status == 401 and isinstance(auth.value.body, dict)

    poor = proxy.make_key("poor", budget_usd="0.01")  # less than one image (0.012)
    with FluxProxy(proxy.url, poor) as client, pytest.raises(fp.BudgetExceeded) as budget:
        client.generate("a fox")
    assert budget.value.status == 402 and budget.value.code == "budget_exceeded"

    slow = proxy.make_key("slow", rate="1/m", burst=1)
    with FluxProxy(proxy.url, slow, retry_timeout=5) as client:
        client.submit("first")
        with pytest.raises(fp.RateLimited) as limited:  # Retry-After 60 s > retry_timeout
            client.submit("second")
    assert limited.value.status == 429 and limited.value.retry_after == 60

    with pytest.raises(fp.ImageInputError):
        fp.encode_image(b"GIF-ish but not an image")


def test_no_provider(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {}, public_base_url="")
    with serving(settings) as url, FluxProxy(url) as client, \
            pytest.raises(fp.NoProvider) as caught:
        client.generate("a fox")
    assert caught.value.status == 503 and isinstance(caught.value, fp.Unavailable)


def test_list_pages_cancel_and_spend(proxy: Proxy) -> None:
    key = proxy.make_key("pager")
    with FluxProxy(proxy.url, key, poll_interval=0.05) as client:
        done = [client.generate(f"fox {i}", seed=i) for i in range(3)]
        pages = list(client.pages(limit=2))
        assert [len(p.data) for p in pages] == [2, 1] and pages[0].next_cursor
        assert [p.id for p in client.list(limit=2)] == [p.id for p in reversed(done)]
        assert [p.id for p in client.list(status="completed")] == [p.id for p in reversed(done)]

        slow = client.submit("[sim:latency=5] to cancel")
        asked = client.cancel(slow.id)
        assert asked.cancel_requested or asked.status == "canceled"
        assert client.wait(slow, timeout=10).status == "canceled"
        with pytest.raises(fp.Conflict):
            client.cancel(slow)

        spend = client.spend(group_by="provider")
        charged = sum(client.get(p).cost_micro_usd for p in [*done, slow])
        assert spend.total.cost_micro_usd == charged >= 36_000  # a canceled job may bill
        assert spend.total.predictions == 4
        assert [r.group for r in spend.rows] == ["wavespeed"]
        (model,) = client.models()
        assert model.id == "flux-dev" and model.providers[0].name == "wavespeed"


def test_image_inputs_and_base64_outputs(proxy: Proxy, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(png(256, 256))
    with FluxProxy(proxy.url, proxy.key) as client:
        pred = client.generate("same fox, winter", image=source, size="256*256",
                               enable_base64_output=True, output_format="png")
        assert pred.outputs[0].startswith("data:image/png;base64,")
        (path,) = pred.save(tmp_path)
    assert path.name == f"{pred.id}-0.png" and Image.open(path).size == (256, 256)
    assert fp.encode_image(png()).startswith("data:image/png;base64,")
    assert fp.encode_image("https://example.com/a.png") == "https://example.com/a.png"
    with pytest.raises(fp.ImageInputError):
        fp.encode_image(str(tmp_path / "missing.png"))


def test_outputs_kept_by_the_proxy_are_fetched_with_the_key(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, auth_enabled=True,
                             admin_key=ADMIN, public_base_url="",
                             output_store=str(tmp_path / "kept"))
    with serving(settings) as url, FluxProxy(url, ADMIN) as client:
        pred = client.generate("a kept fox")
        assert pred.outputs[0].startswith(f"{url}/v1/predictions/{pred.id}/outputs/0")
        (path,) = client.save(pred, tmp_path / "out")
    assert Image.open(path).format == "JPEG" and path.suffix == ".jpg"
    assert auth_headers(f"{url}/v1/x", url, "k") == {"Authorization": "Bearer k"}
    assert auth_headers("http://127.0.0.1:1/x.png", url, "k") == {}


async def test_the_async_client(proxy: Proxy, tmp_path: Path) -> None:
    key = proxy.make_key("async")
    async with AsyncFluxProxy(proxy.url, key, poll_interval=0.05) as client:
        pred = await client.generate("an async fox", seed=7)
        assert pred.completed and pred.seed == 7
        (path,) = await client.save(pred, tmp_path)
        assert path.name.startswith(f"{pred.id}-0.") and path.stat().st_size > 0
        assert pred.save(tmp_path / "blocking")[0].read_bytes() == path.read_bytes()

        slow = await client.generate("[sim:latency=1.2] an async slow fox", timeout=20)
        assert slow.completed  # 202 after sync_timeout_s, then polled
        seen = [p.id async for p in client.list(limit=1)]
        assert seen == [slow.id, pred.id]

        with pytest.raises(fp.PolicyRefused):
            await client.generate("[sim:moderate] async")
        with pytest.raises(fp.ValidationError):
            await client.submit("x", seed=-5)
        canceled = await client.cancel(await client.submit("[sim:latency=5] async cancel"))
        assert (await client.wait(canceled, timeout=10)).status == "canceled"
        spend = await client.spend(group_by="day")
        assert spend.total.predictions == 4


def test_a_lost_proxy_is_a_connect_error_after_bounded_retries() -> None:
    with FluxProxy("http://127.0.0.1:1", "k", max_retries=2, retry_timeout=5) as client, \
            pytest.raises(fp.ConnectError):
        client.get("x")
    data = base64.b64encode(b"not an image").decode()
    assert fp.encode_image(f"data:image/png;base64,{data}").startswith("data:")  # as given


def test_the_client_imports_none_of_the_server() -> None:
    code = ("import sys, flux_proxy; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'proxy', 'providers', 'worker', 'common', 'pydantic', 'sqlalchemy', 'sqlmodel', "
            "'litestar', 'msgspec', 'PIL'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"
