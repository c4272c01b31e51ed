"""The VibeDream wire format (seed: vibedream-flux-dev.txt) served by the proxy: an app
that speaks it switches by changing its base URL and key. Auth is on and every call
carries a client key, as the seed's curl does."""

from __future__ import annotations

import base64
import io
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from PIL import Image

from providers.base import GenerationRequest, JobStatus
from providers.registry import build_provider
from providers.simulators import SimulatorServer
from proxy.api.vibedream_compat import MODERATION_ERROR, poll_view
from proxy.store.models import Prediction

from ._serve import serving
from .conftest import make_settings, metric_value, running_proxy

ADMIN = "vd-admin-key-7f1a"
GENERATE = "/api/v1/models/flux-dev/generate"
# The seed's example body, less the two example.com images (not reachable from tests).
SEED_BODY: dict[str, Any] = {
    "prompt": "A beautiful sunset over mountains with golden light",
    "strength": 0.8,
    "size": "1024*1024",
    "num_inference_steps": 28,
    "guidance_scale": 3.5,
    "num_images": 1,
    "seed": -1,
    "output_format": "jpeg",
}
SUBMIT_KEYS = {"id", "status", "statusUrl", "estimatedTime", "costCents", "createdAt"}
POLL_KEYS = {"id", "modelId", "modelName", "status", "outputs", "error", "createdAt",
             "completedAt", "costCents"}
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def settings(tmp_path: Path, vibedream_sim: SimulatorServer) -> Any:
    return make_settings(tmp_path, {"vibedream": vibedream_sim}, auth_enabled=True,
                         admin_key=ADMIN)


async def create_key(c: Any, name: str, **spec: Any) -> dict[str, str]:
    r = await c.post("/admin/keys", json={"name": name, **spec}, headers=bearer(ADMIN))
    assert r.status_code == 201, r.text
    return bearer(r.json()["key"])


async def poll_until_done(c: Any, url: str, headers: dict[str, str],
                          timeout_s: float = 10.0) -> dict[str, Any]:
    """GET the statusUrl every 20 ms (bounded) until completed or failed."""
    body: dict[str, Any] = {}
    with anyio.fail_after(timeout_s):
        for _ in range(int(timeout_s / 0.02) + 1):
            r = await c.get(url, headers=headers)
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == POLL_KEYS, body
            if body["status"] != "processing":
                return body
            assert body["outputs"] is None and body["completedAt"] is None
            await anyio.sleep(0.02)
    raise AssertionError(f"still processing: {body}")


def cents_of(micro_usd: int) -> int:
    return -(-micro_usd // 10_000)  # rounded up


# --------------------------------------------------------------------------- happy path


async def test_submit_then_poll_to_completed_is_the_same_prediction(settings: Any) -> None:
    async with running_proxy(settings) as c:
        key = await create_key(c, "vd-app")
        labels = {"model": "flux-dev", "surface": "vibedream"}
        before = metric_value((await c.get("/metrics")).text,
                              "flux_proxy_predictions_accepted_total", **labels)
        r = await c.post(GENERATE, json={**SEED_BODY, "num_images": 2}, headers=key)
        assert r.status_code == 200, r.text
        sub = r.json()
        assert set(sub) == SUBMIT_KEYS and sub["status"] == "processing"
        pid = sub["id"]
        assert sub["statusUrl"] == f"http://proxy.test/api/v1/predictions/{pid}"
        assert re.fullmatch(r"\d+-\d+s", sub["estimatedTime"])
        assert sub["costCents"] == 4  # 2 images at the provider's 2 cents
        assert ISO_MS.match(sub["createdAt"])
        assert r.headers["X-Flux-Prediction-Id"] == pid
        assert r.headers["X-Flux-Provider"] == "vibedream"

        done = await poll_until_done(c, sub["statusUrl"], key)
        assert done["status"] == "completed" and done["error"] is None
        assert done["id"] == pid and done["modelId"] == "flux-dev"
        assert done["modelName"] == "FLUX.1 Dev"
        assert len(done["outputs"]) == 2 and ISO_MS.match(done["completedAt"])
        assert done["createdAt"] == sub["createdAt"]
        async with httpx.AsyncClient() as plain:  # a direct download link (the simulator's)
            image = await plain.get(done["outputs"][0])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"

        # The same prediction in the native API, billed to the calling key.
        native = await c.get(f"/v1/predictions/{pid}", headers=key)
        assert native.status_code == 200
        view = native.json()
        assert view["surface"] == "vibedream" and view["outputs"] == done["outputs"]
        assert view["cost_micro_usd"] == 40_000
        assert done["costCents"] == cents_of(view["cost_micro_usd"]) == sub["costCents"]
        poll = await c.get(sub["statusUrl"], headers=key)
        assert poll.headers["X-Flux-Cost-USD"] == view["cost_usd"] == "0.040000"
        assert metric_value((await c.get("/metrics")).text,
                            "flux_proxy_predictions_accepted_total", **labels) == before + 1
        # Another key cannot see it, in either wire format.
        other = await create_key(c, "other-app")
        assert (await c.get(sub["statusUrl"], headers=other)).json() == {
            "error": "Prediction not found"}
        assert (await c.get(f"/v1/predictions/{pid}", headers=other)).status_code == 404


async def test_nulls_are_defaults_and_whole_floats_are_integers(settings: Any) -> None:
    async with running_proxy(settings) as c:
        key = await create_key(c, "vd-app")
        body = {"prompt": "a fox", "image": None, "mask_image": None, "seed": None,
                "num_inference_steps": 20.0, "num_images": 1.0, "size": "512*512"}
        r = await c.post(GENERATE, json=body, headers=key)
        assert r.status_code == 200, r.text
        done = await poll_until_done(c, r.json()["statusUrl"], key)
        assert done["status"] == "completed"
        native = (await c.get(f"/v1/predictions/{done['id']}", headers=key)).json()
        assert native["seed"] >= 0  # null seed: -1, a random one drawn


@pytest.mark.parametrize("upstream", ["vibedream", "wavespeed"])
async def test_moderation_failure_has_the_seed_message(
    tmp_path: Path, request: pytest.FixtureRequest, upstream: str
) -> None:
    # Whichever provider refused it, in the words of the seed.
    sim: SimulatorServer = request.getfixturevalue(f"{upstream}_sim")
    settings = make_settings(tmp_path, {upstream: sim}, auth_enabled=True, admin_key=ADMIN)
    async with running_proxy(settings) as c:
        key = await create_key(c, "vd-app")
        r = await c.post(GENERATE, json={**SEED_BODY, "prompt": "[sim:moderate] a cat"},
                         headers=key)
        assert r.status_code == 200, r.text
        done = await poll_until_done(c, r.json()["statusUrl"], key)
        assert done["status"] == "failed" and done["outputs"] is None
        assert done["error"] == MODERATION_ERROR
        assert ISO_MS.match(done["completedAt"])
        native = (await c.get(f"/v1/predictions/{done['id']}", headers=key)).json()
        assert native["error_kind"] == "policy_refusal"
        # The ledger's cost (VibeDream bills a refused job; WaveSpeed does not).
        assert done["costCents"] == cents_of(native["cost_micro_usd"])


async def test_a_canceled_prediction_polls_as_failed_saying_so(settings: Any) -> None:
    async with running_proxy(settings) as c:
        key = await create_key(c, "vd-app")
        sub = (await c.post(GENERATE, json={**SEED_BODY, "prompt": "[sim:latency=3] a cat"},
                            headers=key)).json()
        canceled = await c.post(f"/v1/predictions/{sub['id']}/cancel", headers=key)
        assert canceled.json()["status"] == "canceled"
        done = await poll_until_done(c, sub["statusUrl"], key, timeout_s=2)
        assert done["status"] == "failed" and done["outputs"] is None
        assert done["error"].startswith("The prediction was canceled.")


def test_proxy_statuses_map_onto_the_three_of_the_seed() -> None:
    now = datetime(2025, 1, 15, 12, 0, 0, 123456, tzinfo=UTC)
    seen = {}
    for status in ("queued", "processing", "completed", "failed", "canceled"):
        pred = Prediction(model="flux-dev", request={}, seed=1, status=status, created_at=now,
                          updated_at=now, outputs=["http://x/0.png"], error="canceled by client"
                          if status == "canceled" else "boom", cost_micro_usd=12_000,
                          completed_at=now if status in ("completed", "failed", "canceled")
                          else None)
        seen[status] = poll_view(pred, [])
    assert seen["queued"].status == seen["processing"].status == "processing"
    assert seen["queued"].outputs is None and seen["queued"].completed_at is None
    assert seen["completed"].outputs == ["http://x/0.png"] and seen["completed"].error is None
    assert seen["failed"].status == "failed" and seen["failed"].error == "boom"
    assert seen["canceled"].status == "failed" and seen["canceled"].outputs is None
    assert "canceled" in (seen["canceled"].error or "")
    assert seen["completed"].created_at == "2025-01-15T12:00:00.123Z"
    assert seen["completed"].cost_cents == 2  # 1.2 cents, rounded up


async def test_data_uri_images_go_to_a_provider_that_takes_them(
    tmp_path: Path, vibedream_sim: SimulatorServer, wavespeed_sim: SimulatorServer
) -> None:
    """Beyond the seed (public URLs only): a data URI is accepted and routed to a
    provider that takes one; with none enabled it is a 422 saying why."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    body = {**SEED_BODY, "size": "512*512",
            "image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}
    for sims, status in (({"vibedream": vibedream_sim, "wavespeed": wavespeed_sim}, 200),
                         ({"vibedream": vibedream_sim}, 422)):
        (tmp_path / str(status)).mkdir()
        settings = make_settings(tmp_path / str(status), sims, auth_enabled=True,
                                 admin_key=ADMIN)
        async with running_proxy(settings) as c:
            key = await create_key(c, "vd-app")
            r = await c.post(GENERATE, json=body, headers=key)
            assert r.status_code == status, r.text
            if status == 200:
                assert r.headers["X-Flux-Provider"] == "wavespeed"
                done = await poll_until_done(c, r.json()["statusUrl"], key)
                assert done["status"] == "completed"
            else:
                assert "public http(s) URL" in r.json()["error"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("body", "field"), [
    ({**SEED_BODY, "strength": 2}, "strength"),
    ({**SEED_BODY, "size": "10*10"}, "size"),
    ({**SEED_BODY, "num_images": 5}, "num_images"),
    ({**SEED_BODY, "num_inference_steps": 2.5}, "num_inference_steps"),
    ({**SEED_BODY, "guidance_scale": "3.5"}, "guidance_scale"),
    ({**SEED_BODY, "output_format": "gif"}, "output_format"),
    ({**SEED_BODY, "seed": -2}, "seed"),
    ({**SEED_BODY, "image": "ftp://example.com/a.png"}, "image"),
    ({**SEED_BODY, "mask_image": "data:image/png;base64,AAAA"}, "mask_image"),
    ({**SEED_BODY, "enable_sync_mode": True}, "enable_sync_mode"),  # not a VibeDream field
    ({"size": "512*512"}, "prompt"),
    (["not", "an", "object"], "body"),
])
async def test_bad_input_is_400_naming_the_field_and_writes_nothing(
    settings: Any, body: Any, field: str
) -> None:
    async with running_proxy(settings) as c:
        key = await create_key(c, "vd-app")
        r = await c.post(GENERATE, json=body, headers=key)
        assert r.status_code == 400, r.text
        err = r.json()
        assert set(err) == {"error"} and isinstance(err["error"], str)
        assert err["error"].startswith(f"{field}:"), err
        assert (await c.get("/v1/predictions", headers=key)).json()["data"] == []


async def test_other_refusals_keep_the_vibedream_shape(settings: Any) -> None:
    settings = settings.model_copy(update={"max_body_bytes": 2048})
    async with running_proxy(settings) as c:
        key = await create_key(c, "vd-app")
        cases = [
            (await c.post(GENERATE, content=b"{nope", headers=key), 400, "not valid JSON"),
            (await c.post("/api/v1/models/sdxl/generate", json=SEED_BODY, headers=key),
             404, "Model 'sdxl' not found"),
            (await c.get("/api/v1/predictions/nope", headers=key), 404, "Prediction not found"),
            (await c.get(GENERATE, headers=key), 405, "Method not allowed"),
            (await c.get("/api/v1/elsewhere", headers=key), 404, "Not found"),
            (await c.post(GENERATE, json={"prompt": "x" * 4000}, headers=key), 413, ""),
        ]
        for r, status, text in cases:
            assert r.status_code == status, (status, r.text)
            assert set(r.json()) == {"error"} and text in r.json()["error"], r.text
        assert cases[3][0].headers["allow"] == "POST"

        poor = await create_key(c, "poor-app", budget_usd="0.01")  # less than 2 cents
        r = await c.post(GENERATE, json=SEED_BODY, headers=poor)
        assert r.status_code == 402 and "budget" in r.json()["error"]

        slow = await create_key(c, "slow-app", rate="1/h")
        assert (await c.post(GENERATE, json=SEED_BODY, headers=slow)).status_code == 200
        r = await c.post(GENERATE, json=SEED_BODY, headers=slow)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "rate limit" in r.json()["error"]


async def test_a_bad_key_is_401_in_the_vibedream_shape(settings: Any) -> None:
    async with running_proxy(settings) as c:
        for method, path in (("POST", GENERATE), ("GET", "/api/v1/predictions/x")):
            for headers in ({}, bearer("fpk_unknown"), {"Authorization": "Basic abc"}):
                r = await c.request(method, path, json=SEED_BODY, headers=headers)
                assert r.status_code == 401, r.text
                assert set(r.json()) == {"error"} and "API key" in r.json()["error"]


async def test_estimated_time_comes_from_the_providers_latencies(settings: Any) -> None:
    async with running_proxy(settings) as c:
        key = await create_key(c, "vd-app")
        first = (await c.post(GENERATE, json=SEED_BODY, headers=key)).json()
        assert first["estimatedTime"] == "5-15s"  # nothing seen yet: the seed's figure
        await poll_until_done(c, first["statusUrl"], key)
        for _ in range(4):  # 5 jobs of ~0.05 s on the simulator in all
            sub = (await c.post(GENERATE, json=SEED_BODY, headers=key)).json()
            await poll_until_done(c, sub["statusUrl"], key)
        assert (await c.post(GENERATE, json=SEED_BODY, headers=key)).json()[
            "estimatedTime"] == "0-1s"


# --------------------------------------------------------------------------- real clients


async def test_curl_like_client_and_our_own_adapter_over_a_socket(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    """Plain httpx as the seed's curl, then the project's VibeDream adapter pointed at
    the proxy: the wire shape is faithful enough for a client written for VibeDream."""
    settings = make_settings(tmp_path, {"vibedream": vibedream_sim}, auth_enabled=True,
                             admin_key=ADMIN, public_base_url="")
    sim_host = httpx.URL(vibedream_sim.base_url).host
    with serving(settings) as base:
        async with httpx.AsyncClient(base_url=base) as curl:
            made = await curl.post("/admin/keys", json={"name": "curl"}, headers=bearer(ADMIN))
            key = made.json()["key"]
            headers = {"Content-Type": "application/json", **bearer(key)}
            sub = (await curl.post(GENERATE, json=SEED_BODY, headers=headers)).json()
            assert sub["statusUrl"] == f"{base}/api/v1/predictions/{sub['id']}"
            done = await poll_until_done(curl, sub["statusUrl"], bearer(key))
            assert done["status"] == "completed" and len(done["outputs"]) == 1

            adapter = build_provider("vibedream", "vibedream", {
                "base_url": base, "api_key": key, "asset_hosts": [sim_host],
                "allow_private_asset_hosts": True, "read_timeout_s": 5.0})
            try:
                req = GenerationRequest(prompt="a fox", seed=7, width=512, height=512,
                                        num_images=2, output_format="png")
                job = await adapter.submit(req)
                assert job.status is JobStatus.PROCESSING and job.charged_micro_usd == 40_000
                assert job.poll_url == f"{base}/api/v1/predictions/{job.upstream_id}"
                with anyio.fail_after(10):
                    while not job.status.terminal:
                        await anyio.sleep(0.02)
                        job = await adapter.poll(job)
                assert job.status is JobStatus.COMPLETED and len(job.outputs) == 2
                data, content_type = await adapter.download(job.outputs[0])
                assert content_type == "image/png" and data[:4] == b"\x89PNG"
            finally:
                await adapter.aclose()
            native = await curl.get(f"/v1/predictions/{job.upstream_id}", headers=bearer(key))
            assert native.json()["surface"] == "vibedream"
            assert native.json()["seed"] == 7
