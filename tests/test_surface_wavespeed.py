"""WaveSpeed's wire format (seed: wavespeed-flux-dev.txt) served by the proxy, driven by
the official `wavespeed` SDK against the proxy under uvicorn and the WaveSpeed simulator,
auth on: an app switches by changing only `base_url` and `api_key`. Plain httpx checks
the envelope and the error shapes; the project's own WaveSpeed adapter pointed at the
proxy proves the envelope is faithful."""

from __future__ import annotations

import base64
import io
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from PIL import Image
from wavespeed import Client

from providers.base import ErrorKind, GenerationRequest, JobStatus
from providers.registry import build_provider
from providers.simulators import SimConfig, SimulatorServer
from proxy.config import TEST_RUN_VARIABLES, Settings

from ._serve import RecordingTransport, serving
from .conftest import make_settings, metric_value

ADMIN = "wavespeed-surface-admin"
MODEL = "wavespeed-ai/flux-dev"
SUBMIT = f"/api/v3/{MODEL}"
DATA_KEYS = {"id", "model", "outputs", "urls", "has_nsfw_contents", "status", "created_at",
             "error", "timings"}
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SYNC_TIMEOUT_S = 1.0


@dataclass
class Proxy:
    url: str
    sim: SimulatorServer
    settings: Settings
    upstream: RecordingTransport

    def key(self, name: str, **spec: Any) -> str:
        r = httpx.post(f"{self.url}/admin/keys", json={"name": name, **spec},
                       headers=bearer(ADMIN))
        assert r.status_code == 201, r.text
        key: str = r.json()["key"]
        return key

    def client(self, key: str) -> Client:
        return Client(api_key=key, base_url=self.url, max_retries=0)

    def submit(self, key: str | None, body: dict[str, Any], path: str = SUBMIT
               ) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=20,
                          headers=bearer(key) if key else None)

    def get(self, key: str | None, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers=bearer(key) if key else None)

    def latest(self, key: str) -> dict[str, Any]:
        """The key's newest prediction, as the native API shows it."""
        r = self.get(key, "/v1/predictions?limit=1")
        assert r.status_code == 200, r.text
        pred: dict[str, Any] = r.json()["data"][0]
        return pred

    def accepted(self) -> float:
        return metric_value(httpx.get(f"{self.url}/metrics").text,
                            "flux_proxy_predictions_accepted_total", model="flux-dev",
                            surface="wavespeed")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One proxy for the module (each test makes its own keys); no public_base_url, so
    URLs point where the client reached it and uploads go upstream as data URIs."""
    tmp = tmp_path_factory.mktemp("wavespeed")
    with SimulatorServer("wavespeed", SimConfig(job_latency_s=0.05)) as sim, \
            pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):  # what conftest's _isolated_env does per test
            if name not in TEST_RUN_VARIABLES and name.startswith(
                    ("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_", "LOCAL_WORKER")):
                mp.delenv(name)
        settings = make_settings(tmp, {"wavespeed": sim}, auth_enabled=True, admin_key=ADMIN,
                                 public_base_url="", media_dir=str(tmp / "media"),
                                 sync_timeout_s=SYNC_TIMEOUT_S, log_level="warning")
        upstream = RecordingTransport()
        with serving(settings, transports={"wavespeed": upstream}) as url:
            yield Proxy(url, sim, settings, upstream)


def png_file(path: Path, size: tuple[int, int] = (320, 256)) -> Path:
    Image.new("RGB", size, (200, 60, 30)).save(path, "PNG")
    return path


# --------------------------------------------------------------------------- the SDK


def test_sdk_run_polls_the_result_and_it_is_the_same_prediction(proxy: Proxy) -> None:
    key = proxy.key("sdk-async")
    before = proxy.accepted()
    out = proxy.client(key).run(MODEL, {"prompt": "a lighthouse", "size": "512*512",
                                        "num_images": 2, "seed": 11},
                                poll_interval=0.05, timeout=20)
    assert len(out["outputs"]) == 2 and all(o.startswith("http") for o in out["outputs"])
    pred = proxy.latest(key)  # the same key sees it on the native API
    assert pred["surface"] == "wavespeed" and pred["status"] == "completed"
    assert pred["outputs"] == out["outputs"] and pred["seed"] == 11
    assert proxy.accepted() == before + 1
    image = Image.open(io.BytesIO(httpx.get(out["outputs"][0]).content))
    assert image.size == (512, 512)


def test_sdk_sync_mode_with_base64_outputs_plain_base64(proxy: Proxy) -> None:
    key = proxy.key("sdk-sync")
    out = proxy.client(key).run(MODEL, {"prompt": "a fox", "size": "256*384",
                                        "output_format": "png",
                                        "enable_base64_output": True},
                                enable_sync_mode=True, timeout=20)
    [b64] = out["outputs"]
    assert not b64.startswith("data:")  # WaveSpeed's base64 is bare
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert image.format == "PNG" and image.size == (256, 384)
    assert proxy.latest(key)["surface"] == "wavespeed"


def test_sdk_upload_then_image_to_image(proxy: Proxy, tmp_path: Path) -> None:
    key = proxy.key("sdk-upload")
    client = proxy.client(key)
    source = png_file(tmp_path / "source.png")
    url = client.upload(str(source))
    assert url.startswith(f"{proxy.url}/api/v3/media/files/") and url.endswith(".png")
    served = httpx.get(url)  # no key: the download URL is public, like WaveSpeed's
    assert served.status_code == 200 and served.content == source.read_bytes()
    assert served.headers["content-type"] == "image/png"

    sent = len(proxy.upstream.submits)
    out = client.run(MODEL, {"prompt": "the same, at dusk", "image": url, "strength": 0.6,
                             "size": "512*512"}, poll_interval=0.05, timeout=20)
    assert len(out["outputs"]) == 1
    pred = proxy.latest(key)
    assert pred["status"] == "completed" and pred["outputs"] == out["outputs"]
    [upstream] = proxy.upstream.submits[sent:]
    # No public_base_url: the simulator cannot fetch the proxy, so it got the bytes inline.
    assert upstream["image"].startswith("data:image/png;base64,")
    assert base64.b64decode(upstream["image"].partition(",")[2]) == source.read_bytes()
    assert upstream["strength"] == 0.6


def test_sdk_raises_the_moderation_error(proxy: Proxy) -> None:
    key = proxy.key("sdk-moderated")
    client = proxy.client(key)
    with pytest.raises(RuntimeError) as polled:
        client.run(MODEL, {"prompt": "something [sim:moderate]"}, poll_interval=0.05,
                   timeout=20)
    pred = proxy.latest(key)
    assert pred["status"] == "failed" and pred["error_kind"] == "policy_refusal"
    assert f"Prediction failed (task_id: {pred['id']})" in str(polled.value)
    assert pred["error"] in str(polled.value)
    with pytest.raises(RuntimeError, match="Prediction failed") as synced:
        client.run(MODEL, {"prompt": "again [sim:moderate]"}, enable_sync_mode=True,
                   timeout=20)
    assert "moderation" in str(synced.value).lower()


def test_sdk_sync_timeout_is_recognised_and_the_task_goes_on(proxy: Proxy) -> None:
    key = proxy.key("sdk-sync-timeout")
    client = proxy.client(key)
    started = time.monotonic()
    result = client.run_no_throw(MODEL, {"prompt": "slow [sim:latency=2.5]"},
                                 enable_sync_mode=True, timeout=20)
    assert time.monotonic() - started < SYNC_TIMEOUT_S + 1.5
    # The SDK's own test: data.code 5004 / "Sync mode timed out" -> status processing.
    assert result["status"] == "processing", result
    assert "Sync mode timed out" in result["error"]
    task = result["task_id"]
    assert task == proxy.latest(key)["id"]
    deadline = time.monotonic() + 10
    while (data := client.get_result(task)["data"])["status"] != "completed":
        assert time.monotonic() < deadline, data
        time.sleep(0.1)
    assert len(data["outputs"]) == 1


def test_sdk_with_a_bad_key_raises_401(proxy: Proxy, tmp_path: Path) -> None:
    client = proxy.client("fpk_not_a_key")
    with pytest.raises(RuntimeError, match="HTTP 401"):
        client.run(MODEL, {"prompt": "x"}, timeout=5)
    with pytest.raises(RuntimeError, match="HTTP 401"):
        client.upload(str(png_file(tmp_path / "k.png")))


# --------------------------------------------------------------------------- the envelope


def test_envelope_headers_and_lookup(proxy: Proxy) -> None:
    key, other = proxy.key("envelope"), proxy.key("someone-else")
    r = proxy.submit(key, {"prompt": "a boat", "image": "", "mask_image": "",
                           "seed": 5, "size": "256*256"})  # the seed's example sends ""
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    data = body["data"]
    assert set(data) == DATA_KEYS
    pid = data["id"]
    assert r.headers["x-flux-prediction-id"] == pid
    assert data["model"] == MODEL and data["status"] in ("created", "processing")
    assert data["outputs"] == [] and data["has_nsfw_contents"] == [] and data["error"] == ""
    assert data["urls"]["get"] == f"{proxy.url}/api/v3/predictions/{pid}/result"
    assert ISO_MS.match(data["created_at"])
    deadline = time.monotonic() + 10
    while (done := proxy.get(key, urlsplit(data["urls"]["get"]).path)).json()["data"][
            "status"] != "completed":
        assert time.monotonic() < deadline, done.text
        time.sleep(0.05)
    result = done.json()["data"]
    assert set(result) == DATA_KEYS and result["id"] == pid
    assert len(result["outputs"]) == 1 and result["has_nsfw_contents"] == [False]
    assert isinstance(result["timings"]["inference"], int) and result["timings"]["inference"] > 0
    assert done.headers["x-flux-provider"] == "wavespeed"
    assert done.headers["x-flux-cost-usd"] == "0.012000"
    assert done.headers["x-flux-prediction-id"] == pid
    plain = proxy.get(key, f"/api/v3/predictions/{pid}")
    assert plain.status_code == 200 and plain.json()["data"] == result
    # Another key's prediction is not found, in WaveSpeed's shape.
    hidden = proxy.get(other, f"/api/v3/predictions/{pid}/result")
    assert hidden.status_code == 404 and hidden.json() == {
        "code": 404, "message": f"Prediction {pid} not found", "data": None}


def test_canceled_is_failed_with_an_error_saying_so(proxy: Proxy) -> None:
    key = proxy.key("cancel")
    pid = proxy.submit(key, {"prompt": "slow [sim:latency=5]"}).json()["data"]["id"]
    r = httpx.post(f"{proxy.url}/v1/predictions/{pid}/cancel", headers=bearer(key))
    assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
    data = proxy.get(key, f"/api/v3/predictions/{pid}/result").json()["data"]
    assert data["status"] == "failed" and "canceled" in data["error"].lower()


# --------------------------------------------------------------------------- errors


def test_bad_parameters_are_400s_naming_the_field(proxy: Proxy) -> None:
    key = proxy.key("bad-params")
    sent = len(proxy.upstream.submits)
    cases = {
        "size": {"prompt": "x", "size": "2048*2048"},
        "num_images": {"prompt": "x", "num_images": 9},
        "prompt": {"size": "512*512"},
        "loras": {"prompt": "x", "loras": [{"path": "a"}]},
        "image": {"prompt": "x", "image": "ftp://example.com/a.png"},
    }
    for field, body in cases.items():
        r = proxy.submit(key, body)
        assert r.status_code == 400, (field, r.text)
        answer = r.json()
        assert answer["code"] == 400 and answer["data"] is None
        assert answer["message"].startswith(f"Invalid parameter {field}"), answer
    r = proxy.submit(key, {"prompt": "x"}, path=f"{SUBMIT}?webhook=https://example.com/h")
    assert r.status_code == 400 and "webhook" in r.json()["message"]
    r = httpx.post(proxy.url + SUBMIT, content=b"{not json", headers=bearer(key))
    assert r.status_code == 400 and r.json()["code"] == 400
    assert len(proxy.upstream.submits) == sent  # nothing went upstream


def test_unknown_models_and_routes(proxy: Proxy) -> None:
    key = proxy.key("unknown-model")
    for path in ("/api/v3/wavespeed-ai/flux-dev-lora", "/api/v3/black-forest-labs/flux-dev",
                 "/api/v3/flux-dev"):
        r = proxy.submit(key, {"prompt": "x"}, path=path)
        assert r.status_code == 404, r.text
        assert r.json()["data"] is None and "wavespeed-ai/flux-dev" in r.json()["message"]
    r = httpx.post(f"{proxy.url}/api/v3/predictions/abc/result", headers=bearer(key))
    assert r.status_code == 405 and r.json()["code"] == 405
    r = proxy.get(key, "/api/v3/nothing/here")
    assert r.status_code == 404 and r.json()["code"] == 404


def test_auth_budget_and_rate_limit_in_the_envelope(proxy: Proxy) -> None:
    for headers in ({}, bearer("fpk_wrong")):
        r = httpx.post(proxy.url + SUBMIT, json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["code"] == 401, r.text
        assert set(r.json()) == {"code", "message"}
        r = httpx.get(f"{proxy.url}/api/v3/predictions/x/result", headers=headers)
        assert r.status_code == 401 and r.json()["code"] == 401
    poor = proxy.key("poor", budget_usd="0.001")
    r = proxy.submit(poor, {"prompt": "x"})
    assert r.status_code == 402 and r.json()["code"] == 402 and r.json()["data"] is None
    limited = proxy.key("limited", rate="1/m", burst=1)
    assert proxy.submit(limited, {"prompt": "x"}).status_code == 200
    r = proxy.submit(limited, {"prompt": "x"})
    assert r.status_code == 429 and r.json()["code"] == 429
    assert int(r.headers["retry-after"]) >= 1


# --------------------------------------------------------------------------- our own adapter


async def test_the_projects_wavespeed_adapter_reads_the_surface(proxy: Proxy) -> None:
    key = proxy.key("adapter")
    adapter = build_provider("through-proxy", "wavespeed", {
        "base_url": proxy.url, "api_key": key,
        "asset_hosts": [urlsplit(proxy.sim.base_url).netloc],
        "allow_private_asset_hosts": True, "read_timeout_s": 5.0})
    try:
        req = GenerationRequest(prompt="a fox", seed=7, width=512, height=512,
                                num_images=2, output_format="png")
        job = await adapter.submit(req)
        assert job.status is JobStatus.PROCESSING
        assert job.poll_url == f"{proxy.url}/api/v3/predictions/{job.upstream_id}/result"
        with anyio.fail_after(10):
            while not job.status.terminal:
                await anyio.sleep(0.05)
                job = await adapter.poll(job)
        assert job.status is JobStatus.COMPLETED and len(job.outputs) == 2
        assert job.has_nsfw_contents == [False, False] and job.inference_ms
        data, content_type = await adapter.download(job.outputs[0])
        assert content_type == "image/png" and data[:4] == b"\x89PNG"

        refused = await adapter.submit(GenerationRequest(prompt="x [sim:moderate]", seed=1))
        with anyio.fail_after(10):
            while not refused.status.terminal:
                await anyio.sleep(0.05)
                refused = await adapter.poll(refused)
        assert refused.status is JobStatus.FAILED and refused.error_kind is ErrorKind.POLICY
    finally:
        await adapter.aclose()
    assert proxy.latest(key)["surface"] == "wavespeed"
