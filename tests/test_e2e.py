"""End to end: the proxy (in-process ASGI) in front of simulators on loopback."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from providers.simulators import SimulatorServer

from .conftest import make_settings, metric_value, running_proxy, wait_for, wait_terminal

PROMPT = "a lighthouse at dusk"


def decode_data_uri(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


@pytest.fixture
def vd_only(tmp_path: Path, vibedream_sim: SimulatorServer):
    return make_settings(tmp_path, {"vibedream": vibedream_sim})


@pytest.fixture
def ws_only(tmp_path: Path, wavespeed_sim: SimulatorServer):
    return make_settings(tmp_path, {"wavespeed": wavespeed_sim})


async def test_async_prediction_through_vibedream(vd_only: Any,
                                                  vibedream_sim: SimulatorServer) -> None:
    async with running_proxy(vd_only) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "size": "768x1024",
                                                  "num_images": 2, "output_format": "png"})
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted["status"] in ("queued", "processing")
        assert accepted["urls"]["get"] == f"http://proxy.test/v1/predictions/{accepted['id']}"
        assert accepted["urls"]["cancel"].endswith(f"{accepted['id']}/cancel")
        assert 0 <= accepted["seed"] <= 2_147_483_647  # -1 became a concrete seed

        done = await wait_terminal(c, accepted["id"])
    assert done["status"] == "completed"
    assert done["provider"] == "vibedream"
    assert done["seed"] == accepted["seed"]
    assert len(done["outputs"]) == 2 and done["has_nsfw_contents"] == [False, False]
    [attempt] = done["attempts"]
    assert attempt["provider"] == "vibedream" and attempt["status"] == "completed"
    assert attempt["upstream_id"] and attempt["latency_ms"] is not None
    # costCents 2 per image -> 2 images = 4 cents = 40_000 micro-USD, exactly.
    assert attempt["cost_micro_usd"] == 40_000
    assert done["cost_micro_usd"] == 40_000 and done["cost_usd"] == "0.040000"
    assert done["completed_at"] and done["started_at"] and done["timings"]["total_ms"] >= 0
    async with httpx.AsyncClient() as h:
        img = Image.open(io.BytesIO((await h.get(done["outputs"][0])).content))
    assert img.size == (768, 1024) and img.format == "PNG"
    assert vibedream_sim.stats["submits"] == 1


async def test_sync_prediction_through_vibedream_is_emulated(vd_only: Any) -> None:
    async with running_proxy(vd_only) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "enable_sync_mode": True,
                                                  "size": "512*512", "seed": 1234})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed" and body["seed"] == 1234
    assert body["outputs"][0].startswith("http")


async def test_sync_prediction_through_wavespeed(ws_only: Any,
                                                 wavespeed_sim: SimulatorServer) -> None:
    async with running_proxy(ws_only) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "enable_sync_mode": True,
                                                  "size": "300*400", "num_images": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed" and body["provider"] == "wavespeed"
    assert len(body["outputs"]) == 3
    # Price table: $0.012 per image.
    assert body["cost_micro_usd"] == 36_000 and body["attempts"][0]["cost_micro_usd"] == 36_000
    # The headers every surface answers with, and the surface it came through.
    assert r.headers["x-flux-prediction-id"] == body["id"]
    assert r.headers["x-flux-cost-usd"] == "0.036000"
    assert r.headers["x-flux-provider"] == "wavespeed"
    assert body["surface"] == "native"
    assert "inference_ms" in body["timings"]
    # Sync emulated by the proxy (use_native_sync is off by default): one submit, polled.
    assert wavespeed_sim.stats["submits"] == 1 and wavespeed_sim.stats["polls"] >= 1


async def test_async_prediction_through_wavespeed(ws_only: Any) -> None:
    async with running_proxy(ws_only) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "size": "512*512"})
        assert r.status_code == 202
        done = await wait_terminal(c, r.json()["id"])
    assert done["status"] == "completed" and done["cost_micro_usd"] == 12_000


async def test_base64_emulated_for_vibedream(vd_only: Any,
                                             vibedream_sim: SimulatorServer) -> None:
    async with running_proxy(vd_only) as c:
        r = await c.post("/v1/predictions", json={
            "prompt": PROMPT, "enable_sync_mode": True, "enable_base64_output": True,
            "size": "512*512", "output_format": "webp", "num_images": 2})
    body = r.json()
    assert body["status"] == "completed", body
    for out in body["outputs"]:
        assert out.startswith("data:image/webp;base64,")
        img = decode_data_uri(out)
        assert img.size == (512, 512) and img.format == "WEBP"
    assert vibedream_sim.stats["asset_gets"] == 2  # downloaded by the proxy


async def test_base64_native_on_wavespeed(ws_only: Any, wavespeed_sim: SimulatorServer) -> None:
    async with running_proxy(ws_only) as c:
        r = await c.post("/v1/predictions", json={
            "prompt": PROMPT, "enable_sync_mode": True, "enable_base64_output": True,
            "size": "256*256", "output_format": "png"})
    body = r.json()
    assert body["outputs"][0].startswith("data:image/png;base64,")
    assert decode_data_uri(body["outputs"][0]).size == (256, 256)
    assert wavespeed_sim.stats["asset_gets"] == 0  # upstream encoded it


async def test_base64_refuses_output_from_a_host_outside_the_allowlist(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    settings = make_settings(tmp_path, {"vibedream": vibedream_sim},
                             provider_extra={"vibedream": {"asset_hosts": ["assets.vibedream.ai"]}})
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={
            "prompt": PROMPT, "enable_sync_mode": True, "enable_base64_output": True,
            "size": "512*512"})
    body = r.json()
    assert body["status"] == "failed"
    # Our own allowlist refused it: a configuration error naming the setting.
    assert body["attempts"][0]["error_kind"] == "configuration_error"
    assert "providers.vibedream.asset_hosts" in body["attempts"][0]["error"]
    assert vibedream_sim.stats["asset_gets"] == 0


@pytest.mark.parametrize("provider", ["vibedream", "wavespeed"])
async def test_moderation_refusal_does_not_fail_over(
    tmp_path: Path, vibedream_sim: SimulatorServer, wavespeed_sim: SimulatorServer,
    provider: str,
) -> None:
    sims = {"vibedream": vibedream_sim, "wavespeed": wavespeed_sim}
    first = sims[provider]
    other = wavespeed_sim if provider == "vibedream" else vibedream_sim
    first.config.moderate = True
    order = {provider: first, ("wavespeed" if provider == "vibedream" else "vibedream"): other}
    async with running_proxy(make_settings(tmp_path, order)) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "enable_sync_mode": True,
                                                  "size": "512*512"})
    body = r.json()
    assert body["status"] == "failed"
    assert body["error_kind"] == "policy_refusal"
    assert "moderation" in body["error"].lower()
    assert [a["provider"] for a in body["attempts"]] == [provider]
    assert other.stats["submits"] == 0


async def test_nsfw_flags_passed_through_per_image(ws_only: Any) -> None:
    async with running_proxy(ws_only) as c:
        r = await c.post("/v1/predictions", json={
            "prompt": PROMPT + " [sim:nsfw=1]", "enable_sync_mode": True, "num_images": 3,
            "size": "256*256"})
    body = r.json()
    assert body["status"] == "completed"
    assert body["has_nsfw_contents"] == [False, True, False]


async def test_cost_recorded_per_attempt_including_failed_billed_ones(
    tmp_path: Path, vibedream_sim: SimulatorServer, wavespeed_sim: SimulatorServer
) -> None:
    # VibeDream accepts (quoting costCents) then fails; WaveSpeed then completes.
    vibedream_sim.config.fail_after_accept = True
    settings = make_settings(tmp_path, {"vibedream": vibedream_sim, "wavespeed": wavespeed_sim})
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "enable_sync_mode": True,
                                                  "size": "512*512"})
    body = r.json()
    assert body["status"] == "completed" and body["provider"] == "wavespeed"
    costs = [(a["provider"], a["status"], a["cost_micro_usd"]) for a in body["attempts"]]
    assert costs == [("vibedream", "failed", 20_000), ("wavespeed", "completed", 12_000)]
    assert body["cost_micro_usd"] == 32_000


async def test_wavespeed_failed_task_is_refunded_and_fails_over(
    tmp_path: Path, vibedream_sim: SimulatorServer, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.fail_after_accept = True
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim, "vibedream": vibedream_sim})
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "enable_sync_mode": True,
                                                  "size": "512*512"})
    body = r.json()
    assert body["status"] == "completed" and body["provider"] == "vibedream"
    assert body["attempts"][0]["cost_micro_usd"] == 0  # WaveSpeed refunds failed tasks
    assert body["cost_micro_usd"] == 20_000


async def test_fallback_when_first_provider_is_down(
    tmp_path: Path, vibedream_sim: SimulatorServer, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.error_rate = 1.0
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim, "vibedream": vibedream_sim})
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "enable_sync_mode": True,
                                                  "size": "512*512"})
    body = r.json()
    assert body["status"] == "completed"
    assert [(a["provider"], a["status"], a["error_kind"]) for a in body["attempts"]] == [
        ("wavespeed", "failed", "unavailable"), ("vibedream", "completed", None)]


async def test_wavespeed_sync_give_up_is_polled_never_resubmitted(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.sync_give_up_s = 0.2
    wavespeed_sim.config.job_latency_s = 0.6
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim},
                             provider_extra={"wavespeed": {"use_native_sync": True}})
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "enable_sync_mode": True,
                                                  "size": "512*512"})
    body = r.json()
    assert body["status"] == "completed", body
    assert len(body["attempts"]) == 1
    assert wavespeed_sim.stats["submits"] == 1 and wavespeed_sim.stats["polls"] >= 1


async def test_wavespeed_bare_504_in_sync_mode_is_outcome_unknown(
    tmp_path: Path, vibedream_sim: SimulatorServer, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.sync_give_up_s = 0.1
    wavespeed_sim.config.sync_timeout_mode = "504"
    wavespeed_sim.config.job_latency_s = 0.5
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim, "vibedream": vibedream_sim},
                             provider_extra={"wavespeed": {"use_native_sync": True}})
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "enable_sync_mode": True,
                                                  "size": "512*512"})
    body = r.json()
    assert body["status"] == "completed" and body["provider"] == "vibedream"
    first = body["attempts"][0]
    assert first["status"] == "unknown" and first["error_kind"] == "outcome_unknown"
    assert first["cost_micro_usd"] == 12_000  # may have been billed: counted, conservatively
    assert wavespeed_sim.stats["submits"] == 1


async def test_sync_timeout_answers_with_the_running_prediction(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    vibedream_sim.config.job_latency_s = 1.0
    settings = make_settings(tmp_path, {"vibedream": vibedream_sim}, sync_timeout_s=0.2)
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "enable_sync_mode": True,
                                                  "size": "512*512"})
        assert r.status_code == 202
        assert r.json()["status"] == "processing"
        done = await wait_terminal(c, r.json()["id"])
    assert done["status"] == "completed"


async def test_cancel(tmp_path: Path, vibedream_sim: SimulatorServer) -> None:
    vibedream_sim.config.job_latency_s = 5.0
    async with running_proxy(make_settings(tmp_path, {"vibedream": vibedream_sim})) as c:
        r = await c.post("/v1/predictions", json={"prompt": PROMPT, "size": "512*512"})
        pred_id = r.json()["id"]
        # Wait until the upstream accepted it, then cancel.
        await wait_for(c, pred_id, lambda b: b["attempts"] and b["attempts"][0]["upstream_id"])
        r = await c.post(f"/v1/predictions/{pred_id}/cancel")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "canceled"
        assert body["attempts"][0]["status"] == "canceled"
        # VibeDream quoted costCents at submit: the canceled attempt is still billed.
        assert body["cost_micro_usd"] == 20_000
        again = await c.post(f"/v1/predictions/{pred_id}/cancel")
        assert again.status_code == 409
        missing = await c.post("/v1/predictions/nope/cancel")
        assert missing.status_code == 404
        assert (await c.get("/v1/predictions/nope")).status_code == 404


async def test_list_newest_first_with_cursor_and_status_filter(vd_only: Any) -> None:
    async with running_proxy(vd_only) as c:
        ids = []
        for i in range(5):
            r = await c.post("/v1/predictions", json={"prompt": f"{PROMPT} {i}",
                                                      "size": "512*512",
                                                      "enable_sync_mode": True})
            ids.append(r.json()["id"])
        failed = await c.post("/v1/predictions", json={
            "prompt": PROMPT + " [sim:moderate]", "size": "512*512", "enable_sync_mode": True})
        ids.append(failed.json()["id"])
        seen: list[str] = []
        cursor = None
        for _ in range(10):
            q = "/v1/predictions?limit=2" + (f"&cursor={cursor}" if cursor else "")
            page = (await c.get(q)).json()
            seen += [p["id"] for p in page["data"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == list(reversed(ids))
        only_failed = (await c.get("/v1/predictions?status=failed")).json()["data"]
        assert [p["id"] for p in only_failed] == [failed.json()["id"]]


async def test_models_health_metrics_and_openapi(tmp_path: Path,
                                                 vibedream_sim: SimulatorServer) -> None:
    async with running_proxy(make_settings(tmp_path, {"vibedream": vibedream_sim})) as c:
        models = (await c.get("/v1/models")).json()["data"]
        assert models[0]["id"] == "flux-dev"
        providers = {p["name"]: p for p in models[0]["providers"]}
        assert providers["vibedream"]["enabled"] is True
        assert "1024*1024" in providers["vibedream"]["capabilities"]["sizes"]
        assert providers["wavespeed"]["enabled"] is False
        assert "WAVESPEED_API_KEY" in providers["wavespeed"]["disabled_reason"]

        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["database"] == "ok"

        finished = {"model": "flux-dev", "provider": "vibedream", "status": "completed",
                    "surface": "native"}
        before = metric_value((await c.get("/metrics")).text, "flux_proxy_predictions_total",
                              **finished)
        await c.post("/v1/predictions", json={"prompt": PROMPT, "size": "512*512",
                                              "enable_sync_mode": True})
        text = (await c.get("/metrics")).text
        # Exactly one more completed prediction (the counters are process-wide).
        assert metric_value(text, "flux_proxy_predictions_total", **finished) == before + 1
        assert "flux_proxy_upstream_request_duration_seconds_bucket" in text
        assert "flux_proxy_http_requests_total" in text

        spec = (await c.get("/schema/openapi.json")).json()
        create = spec["paths"]["/v1/predictions"]["post"]
        props = create["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert {"prompt", "size", "enable_sync_mode", "enable_base64_output"} <= set(props)
