"""The OpenAI images API surface (/v1/images/*, /v1/models) driven by the official
`openai` SDK against the proxy under uvicorn and the WaveSpeed simulator, auth on:
an app switches by changing only `base_url` and `api_key`."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import sqlite3
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from providers.simulators import SimConfig, SimulatorServer
from proxy.config import TEST_RUN_VARIABLES, Settings

from ._serve import RecordingTransport, serving
from .conftest import make_settings, metric_value

ADMIN = "openai-surface-admin"
MAX_BODY = 1024 * 1024
GENERATIONS = "/v1/images/generations"


@dataclass
class Proxy:
    url: str
    sim: SimulatorServer
    settings: Settings
    upstream: RecordingTransport
    clients: list[OpenAI] = field(default_factory=list)

    def key(self, name: str, **spec: Any) -> str:
        r = httpx.post(f"{self.url}/admin/keys", json={"name": name, **spec},
                       headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text
        key: str = r.json()["key"]
        return key

    def client(self, key: str, max_retries: int = 0) -> OpenAI:
        client = OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=max_retries,
                        timeout=20)
        self.clients.append(client)  # closed with the proxy
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def prediction(self, key: str, prediction_id: str) -> httpx.Response:
        return httpx.get(f"{self.url}/v1/predictions/{prediction_id}",
                         headers={"Authorization": f"Bearer {key}"})

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(httpx.get(f"{self.url}/metrics").text, name, **labels)

    def answered(self, status: int, path: str = GENERATIONS) -> float:
        """Responses with `status` on `path` so far (the SDK's tries are each one)."""
        return self.metric("flux_proxy_http_requests_total", method="POST", path=path,
                           status_code=str(status))

    def stored_request(self, prediction_id: str) -> dict[str, Any]:
        """The request column of the prediction's row (a plain read of the SQLite file)."""
        path = self.settings.database_url.removeprefix("sqlite+aiosqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as db:
            [(raw,)] = db.execute("SELECT request FROM predictions WHERE id = ?",
                                  (prediction_id,)).fetchall()
        stored: dict[str, Any] = json.loads(raw)
        return stored


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """One proxy for the module (each test makes its own keys)."""
    with SimulatorServer("wavespeed", SimConfig(job_latency_s=0.05)) as sim, \
            pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):  # what conftest's _isolated_env does per test
            if name not in TEST_RUN_VARIABLES and name.startswith(
                    ("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_", "LOCAL_WORKER")):
                mp.delenv(name)
        settings = make_settings(tmp_path_factory.mktemp("openai"), {"wavespeed": sim},
                                 auth_enabled=True, admin_key=ADMIN, max_body_bytes=MAX_BODY,
                                 log_level="warning")
        upstream = RecordingTransport()
        with serving(settings, transports={"wavespeed": upstream}) as url:
            served = Proxy(url, sim, settings, upstream)
            yield served
            served.close()


def png(size: tuple[int, int] = (320, 256), mode: str = "RGB", color: Any = (40, 90, 200),
        transparent_left: bool = False) -> bytes:
    im = Image.new(mode, size, color)
    if transparent_left:  # OpenAI's mask: the left half is where to edit
        im.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def data_uri_image(uri: str) -> tuple[bytes, Image.Image]:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:image/") and head.endswith(";base64"), head[:60]
    data = base64.b64decode(payload, validate=True)
    return data, Image.open(io.BytesIO(data))


# --------------------------------------------------------------------------- generations


def test_generate_url_is_one_billed_prediction_of_the_calling_key(proxy: Proxy) -> None:
    key = proxy.key("gen-url")
    accepted = {"model": "flux-dev", "surface": "openai"}
    before = proxy.metric("flux_proxy_predictions_accepted_total", **accepted)
    raw = proxy.client(key).images.with_raw_response.generate(
        model="flux-dev", prompt="a lighthouse at dusk", size="512x512", user="u-1",
        quality="standard",
        extra_body={"seed": 42, "num_inference_steps": 20, "guidance_scale": 5.0})
    res = raw.parse()
    assert res.size == "512x512" and res.output_format == "png" and res.usage is None
    assert abs(res.created - time.time()) < 60
    [image] = res.data or []
    assert image.url and image.b64_json is None
    fetched = httpx.get(image.url)
    assert Image.open(io.BytesIO(fetched.content)).size == (512, 512)
    # FLUX parameters from extra_body reached the provider, mapped.
    sent = proxy.upstream.submits[-1]
    assert (sent["size"], sent["num_images"], sent["seed"]) == ("512*512", 1, 42)
    assert (sent["num_inference_steps"], sent["guidance_scale"]) == (20, 5.0)

    pid = raw.headers["x-flux-prediction-id"]
    assert float(raw.headers["x-flux-cost-usd"]) > 0
    assert raw.headers["x-flux-provider"] == "wavespeed"
    pred = proxy.prediction(key, pid).json()
    assert pred["status"] == "completed" and pred["surface"] == "openai"
    assert pred["outputs"] == [image.url] and pred["seed"] == 42
    assert pred["cost_micro_usd"] > 0
    assert proxy.prediction(proxy.key("someone-else"), pid).status_code == 404
    assert proxy.metric("flux_proxy_predictions_accepted_total", **accepted) == before + 1


def test_generate_b64_json_four_images(proxy: Proxy) -> None:
    res = proxy.client(proxy.key("gen-b64")).images.generate(
        prompt="four lighthouses", n=4, size="256x384", response_format="b64_json",
        output_format="webp")
    assert len(res.data or []) == 4 and res.size == "256x384" and res.output_format == "webp"
    for image in res.data or []:
        assert image.url is None and image.b64_json is not None
        assert not image.b64_json.startswith("data:")  # bare base64, as OpenAI sends it
        decoded = Image.open(io.BytesIO(base64.b64decode(image.b64_json, validate=True)))
        assert decoded.format == "WEBP" and decoded.size == (256, 384)
    assert proxy.upstream.submits[-1]["num_images"] == 4


# --------------------------------------------------------------------------- edits


def test_edit_without_mask_is_image_to_image(proxy: Proxy) -> None:
    key = proxy.key("edit-img2img")
    source = png((320, 256))
    raw = proxy.client(key).images.with_raw_response.edit(
        image=("photo.png", source, "image/png"), prompt="make it autumn",
        extra_body={"strength": 0.6})
    res = raw.parse()
    assert res.size == "320x256" and len(res.data or []) == 1  # size auto: the image's
    sent = proxy.upstream.submits[-1]
    assert data_uri_image(sent["image"])[0] == source and "mask_image" not in sent
    assert sent["strength"] == 0.6 and sent["size"] == "320*256"
    pid = raw.headers["x-flux-prediction-id"]
    pred = proxy.prediction(key, pid).json()
    assert pred["status"] == "completed" and pred["surface"] == "openai"
    stored = proxy.stored_request(pid)  # an image-to-image prediction
    assert stored["image"] == "sha256:" + hashlib.sha256(sent["image"].encode()).hexdigest()
    assert stored["mask_image"] is None


def test_edit_with_openai_mask_is_inpainting_with_a_flux_mask(proxy: Proxy) -> None:
    key = proxy.key("edit-inpaint")
    client = proxy.client(key)
    # A list of one image: the SDK sends it as `image[]`.
    raw = client.images.with_raw_response.edit(
        image=[("photo.png", png((320, 256)))], prompt="a red door on the left",
        mask=("mask.png", png((320, 256), "RGBA", (0, 0, 0, 255), transparent_left=True)),
        size="512x512")
    assert raw.parse().size == "512x512"
    sent = proxy.upstream.submits[-1]
    _, mask = data_uri_image(sent["mask_image"])
    assert mask.format == "PNG" and mask.mode == "L" and mask.size == (320, 256)
    # Transparent (OpenAI: edit here) became white (FLUX: regenerate); opaque, black.
    assert mask.getpixel((10, 10)) == 255 and mask.getpixel((159, 255)) == 255
    assert mask.getpixel((160, 0)) == 0 and mask.getpixel((319, 255)) == 0
    stored = proxy.stored_request(raw.headers["x-flux-prediction-id"])
    assert stored["mask_image"] == "sha256:" + hashlib.sha256(
        sent["mask_image"].encode()).hexdigest()

    # A mask without alpha, or opaque everywhere, is FLUX's convention already (white:
    # regenerate): sent on unchanged.
    for mode, white in (("L", 255), ("RGBA", (255, 255, 255, 255))):
        flux_mask = png((320, 256), mode, white)
        client.images.edit(image=("photo.png", png((320, 256))), prompt="repaint it all",
                           mask=("mask.png", flux_mask))
        assert data_uri_image(proxy.upstream.submits[-1]["mask_image"])[0] == flux_mask


# --------------------------------------------------------------------------- errors


GENERATE_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"n": 5}, "n"),
    ({"size": "2048x2048"}, "size"),
    ({"model": "dall-e-3"}, "model"),
    ({"quality": "hd"}, "quality"),
    ({"style": "vivid"}, "style"),
    ({"background": "transparent"}, "background"),
    ({"response_format": "base64"}, "response_format"),
    ({"output_format": "gif"}, "output_format"),
    ({"extra_body": {"guidance_scale": 50}}, "guidance_scale"),
    ({"extra_body": {"num_images": 2}}, "num_images"),  # OpenAI's name for it is n
    ({"extra_body": {"providers": ["nope"]}}, "providers"),
]


def test_bad_requests_are_400_naming_the_param_and_nothing_is_sent(proxy: Proxy) -> None:
    key = proxy.key("bad-requests")
    client = proxy.client(key)
    submits = len(proxy.upstream.submits)
    for kwargs, param in GENERATE_REFUSALS:
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt="a lighthouse", **kwargs)
        err = info.value
        assert (err.param, err.type) == (param, "invalid_request_error"), (kwargs, err.body)
        assert param in err.message
    image = ("photo.png", png((320, 256)))
    edit_refusals: list[tuple[dict[str, Any], str]] = [
        ({"image": ("notes.png", b"not an image at all")}, "image"),
        ({"image": [image, image]}, "image"),  # one input image per FLUX request
        ({"image": image, "mask": ("mask.png", png((256, 256), "RGBA"))}, "mask"),
        ({"image": ("tiny.png", png((32, 32)))}, "image"),  # under the request-image limits
        ({"image": image, "n": 9}, "n"),
    ]
    for kwargs, param in edit_refusals:
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(prompt="repaint", **kwargs)
        assert info.value.param == param, (kwargs, info.value.body)
    with pytest.raises(openai.BadRequestError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks it deprecated
        client.images.create_variation(image=image)
    assert info.value.code == "unsupported_endpoint"
    assert len(proxy.upstream.submits) == submits
    listed = httpx.get(f"{proxy.url}/v1/predictions", headers={"Authorization": f"Bearer {key}"})
    assert listed.json()["data"] == []  # nothing written


def test_bad_or_missing_key_is_openai_401(proxy: Proxy) -> None:
    client = proxy.client("fpk_not-a-key")
    with pytest.raises(openai.AuthenticationError) as info:
        client.images.generate(prompt="a lighthouse")
    assert (info.value.code, info.value.type) == ("invalid_api_key", "invalid_request_error")
    with pytest.raises(openai.AuthenticationError):
        client.images.edit(image=("photo.png", png()), prompt="repaint")
    missing = httpx.post(f"{proxy.url}{GENERATIONS}", json={"prompt": "a lighthouse"})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"


def test_exhausted_budget_is_insufficient_quota_and_not_retried(proxy: Proxy) -> None:
    client = proxy.client(proxy.key("capped", budget_usd="0.012"), max_retries=2)
    client.images.generate(prompt="one image is all it can pay")  # $0.012, one image
    before = proxy.answered(429)
    with pytest.raises(openai.RateLimitError) as info:
        client.images.generate(prompt="one too many")
    assert (info.value.code, info.value.type) == ("insufficient_quota", "insufficient_quota")
    assert info.value.response.headers["x-should-retry"] == "false"
    assert proxy.answered(429) == before + 1  # the SDK asked once


def test_rate_limit_is_retried_by_the_sdk_once_the_bucket_refills(proxy: Proxy) -> None:
    key = proxy.key("limited", rate="1/s", burst=1)
    proxy.client(key).images.generate(prompt="first")
    with pytest.raises(openai.RateLimitError) as info:
        proxy.client(key).images.generate(prompt="too soon")
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["retry-after"] == "1"
    before = proxy.answered(429)
    started = time.monotonic()
    res = proxy.client(key, max_retries=2).images.generate(prompt="waits its turn")
    assert len(res.data or []) == 1
    assert proxy.answered(429) == before + 1 and time.monotonic() - started >= 0.9


def test_moderation_is_content_policy_violation(proxy: Proxy) -> None:
    key = proxy.key("moderated")
    with pytest.raises(openai.BadRequestError) as info:
        proxy.client(key).images.generate(prompt="[sim:moderate] something flagged")
    assert info.value.code == "content_policy_violation"
    pred = proxy.prediction(key, info.value.response.headers["x-flux-prediction-id"]).json()
    assert pred["status"] == "failed" and pred["error_kind"] == "policy_refusal"


def test_upstream_failure_is_502_and_not_retried(proxy: Proxy) -> None:
    before = proxy.answered(502)
    with pytest.raises(openai.InternalServerError) as info:
        proxy.client(proxy.key("failing"), max_retries=2).images.generate(
            prompt="[sim:fail-after-accept] a lighthouse")
    assert info.value.status_code == 502 and info.value.type == "server_error"
    assert proxy.answered(502) == before + 1  # the proxy failed over already; no SDK retry


def test_models_list_and_retrieve(proxy: Proxy) -> None:
    client = proxy.client(proxy.key("models"))
    [model] = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("flux-dev", "model", "flux-proxy")
    assert isinstance(model.created, int) and model.created > 0
    assert client.models.retrieve("flux-dev").id == "flux-dev"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("dall-e-3")
    assert info.value.code == "model_not_found"


def test_too_large_wrong_method_and_unknown_route_are_openai_shaped(proxy: Proxy) -> None:
    key = proxy.key("shapes")
    with pytest.raises(openai.APIStatusError) as info:
        proxy.client(key).images.edit(image=("big.png", b"\x89PNG" + bytes(MAX_BODY)),
                                      prompt="too big")
    assert info.value.status_code == 413 and info.value.code == "request_too_large"
    headers = {"Authorization": f"Bearer {key}"}
    for method, path, status in (("GET", GENERATIONS, 405), ("POST", "/v1/images/nope", 404)):
        r = httpx.request(method, f"{proxy.url}{path}", headers=headers)
        assert r.status_code == status
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_not_ready_within_sync_timeout_is_504_with_the_prediction_id(
    tmp_path: Path, wavespeed_sim: SimulatorServer, request: pytest.FixtureRequest
) -> None:
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, auth_enabled=True,
                             admin_key=ADMIN, sync_timeout_s=0.3, log_level="warning")
    with serving(settings) as url:
        served = Proxy(url, wavespeed_sim, settings, RecordingTransport())
        request.addfinalizer(served.close)
        key = served.key("patient")
        with pytest.raises(openai.InternalServerError) as info:
            served.client(key, max_retries=2).images.generate(prompt="[sim:latency=1.5] slow")
        err = info.value
        assert (err.status_code, err.code) == (504, "timeout")
        assert err.response.headers["x-should-retry"] == "false"
        assert wavespeed_sim.stats["submits"] == 1  # not submitted again
        pid = err.response.headers["x-flux-prediction-id"]
        assert pid in err.message
        deadline = time.monotonic() + 10
        while (pred := served.prediction(key, pid).json())["status"] != "completed":
            assert time.monotonic() < deadline, pred
            time.sleep(0.05)
        assert pred["surface"] == "openai" and len(pred["outputs"]) == 1
