"""Every validation rule of POST /v1/predictions; nothing is written for a rejected request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from common.media import OutboundGuard
from providers.simulators import SimulatorServer
from proxy.api import inputs
from proxy.schema import GenerateRequest, field_errors

from .conftest import make_settings, running_proxy

BAD_FIELDS: list[tuple[str, Any, str]] = [
    ("prompt", "", "at least 1"),
    ("prompt", "   ", "blank"),
    ("prompt", "x" * 20_001, "at most"),
    ("prompt", 42, "valid string"),
    ("strength", -0.1, "greater than or equal to 0"),
    ("strength", 1.01, "less than or equal to 1"),
    ("strength", "0.5", "valid number"),
    ("size", "100*100", "256..1536"),
    ("size", "2048*1024", "256..1536"),
    ("size", "1024*", "look like"),
    ("size", "big", "look like"),
    ("size", 1024, "valid string"),
    ("num_inference_steps", 0, "greater than or equal to 1"),
    ("num_inference_steps", 51, "less than or equal to 50"),
    ("num_inference_steps", 28.5, "valid integer"),
    ("num_inference_steps", "28", "valid integer"),
    ("guidance_scale", 0.5, "greater than or equal to 1"),
    ("guidance_scale", 20.5, "less than or equal to 20"),
    ("num_images", 0, "greater than or equal to 1"),
    ("num_images", 5, "less than or equal to 4"),
    ("seed", -2, "greater than or equal to -1"),
    ("seed", 2_147_483_648, "less than or equal to 2147483647"),
    ("output_format", "gif", "'jpeg', 'png' or 'webp'"),
    ("enable_base64_output", "yes", "valid boolean"),
    ("enable_safety_checker", 1, "valid boolean"),
    ("enable_sync_mode", "true", "valid boolean"),
    ("image", "ftp://example.com/a.png", "http(s) URL"),
    ("image", "not a url", "http(s) URL"),
    ("image", "data:text/plain;base64,AAAA", "not accepted"),
    ("image", "data:image/svg+xml;base64,PHN2Zy8+", "SVG and other types are refused"),
    ("image", "data:image/png,%89PNG", "data:image/png;base64"),
    ("image", "data:image/png;base64", "data:image/png;base64"),
    ("image", "http://user:pw@example.com/a.png", "credentials"),
    ("image", "https://example.com/" + "a" * 4100, "longer than 4096"),
    ("image", 42, "valid string"),
    ("mask_image", "data:image/svg+xml;base64,PHN2Zy8+", "not accepted"),
    ("mask_image", "file:///etc/passwd", "http(s) URL"),
    ("model", "flux-pro", "unknown model"),
    ("surprise", 1, "unknown field"),
]


@pytest.fixture(autouse=True)
def _no_real_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Image URLs reaching the content checks must never be resolved for real."""

    async def refuse(host: str, port: int) -> list[str]:
        raise AssertionError(f"a test tried to resolve {host!r} for real")

    monkeypatch.setattr(inputs, "DEFAULT_CHECKER",
                        inputs.RequestImageChecker(guard=OutboundGuard(resolver=refuse)))


@pytest.fixture
async def client(tmp_path: Path, vibedream_sim: SimulatorServer, wavespeed_sim: SimulatorServer):
    settings = make_settings(tmp_path, {"vibedream": vibedream_sim, "wavespeed": wavespeed_sim},
                             max_body_bytes=64 * 1024)
    async with running_proxy(settings) as c:
        yield c


async def _assert_nothing_written(client: Any, *sims: SimulatorServer) -> None:
    listing = (await client.get("/v1/predictions")).json()
    assert listing["data"] == []
    for sim in sims:
        assert sim.stats["submits"] == 0


@pytest.mark.parametrize(("field", "value", "reason"), BAD_FIELDS,
                         ids=[f"{f}={str(v)[:12]}" for f, v, _ in BAD_FIELDS])
async def test_bad_field_is_422_naming_field_value_and_range(
    client: Any, field: str, value: Any, reason: str,
    vibedream_sim: SimulatorServer, wavespeed_sim: SimulatorServer,
) -> None:
    body = {"prompt": "a lighthouse", field: value}
    r = await client.post("/v1/predictions", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "validation_error"
    detail = next(d for d in err["details"] if d["field"] == field)
    assert reason in detail["reason"]
    if field != "surprise":
        assert detail["allowed"], "the allowed range is stated"
    expected = value if not (isinstance(value, str) and len(value) > 120) else None
    if isinstance(value, str) and "@" in value:
        expected = None  # credentials are masked: test_image_credentials_are_not_echoed
    if expected is not None:
        assert detail["value"] == expected
    await _assert_nothing_written(client, vibedream_sim, wavespeed_sim)


async def test_every_bad_field_is_reported_at_once(client: Any) -> None:
    r = await client.post("/v1/predictions", json={
        "prompt": "x", "num_images": 9, "seed": -5, "strength": 3})
    assert r.status_code == 422
    fields = {d["field"] for d in r.json()["error"]["details"]}
    assert fields == {"num_images", "seed", "strength"}


async def test_missing_prompt(client: Any) -> None:
    r = await client.post("/v1/predictions", json={"size": "512*512"})
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "prompt"


async def test_mask_without_image(client: Any) -> None:
    r = await client.post("/v1/predictions", json={
        "prompt": "x", "mask_image": "https://assets.example.com/m.png"})
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "mask_image"


async def test_invalid_json_is_400(client: Any, vibedream_sim: SimulatorServer,
                                   wavespeed_sim: SimulatorServer) -> None:
    r = await client.post("/v1/predictions", content=b'{"prompt": "x",',
                          headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    await _assert_nothing_written(client, vibedream_sim, wavespeed_sim)


async def test_non_object_body_is_422(client: Any) -> None:
    r = await client.post("/v1/predictions", json=["prompt"])
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "body"


async def test_body_over_limit_is_413(client: Any, vibedream_sim: SimulatorServer,
                                      wavespeed_sim: SimulatorServer) -> None:
    huge = json.dumps({"prompt": "x", "image": "data:image/png;base64," + "A" * 70_000})
    r = await client.post("/v1/predictions", content=huge,
                          headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    await _assert_nothing_written(client, vibedream_sim, wavespeed_sim)


async def test_bad_list_query_params(client: Any) -> None:
    assert (await client.get("/v1/predictions?status=done")).status_code == 422
    assert (await client.get("/v1/predictions?cursor=%%%")).status_code == 422
    assert (await client.get("/v1/predictions?limit=0")).status_code == 400
    assert (await client.get("/v1/predictions?limit=101")).status_code == 400


def test_defaults_are_the_seeds_defaults() -> None:
    req = GenerateRequest.model_validate_json(b'{"prompt": "x"}')
    gen = req.to_generation(seed=7)
    assert (req.model, req.size, req.strength, req.num_inference_steps, req.guidance_scale,
            req.num_images, req.seed, req.output_format) == (
        "flux-dev", "1024*1024", 0.8, 28, 3.5, 1, -1, "jpeg")
    assert (req.enable_base64_output, req.enable_safety_checker, req.enable_sync_mode) == (
        False, True, False)
    assert (gen.width, gen.height, gen.seed) == (1024, 1024, 7)


@pytest.mark.parametrize("size", ["768x1024", "768X1024", "768*1024", " 768 * 1024 "])
def test_size_accepts_star_and_x(size: str) -> None:
    req = GenerateRequest.model_validate({"prompt": "x", "size": size})
    assert req.size == "768*1024"


async def test_image_credentials_are_not_echoed(client: Any) -> None:
    r = await client.post("/v1/predictions", json={
        "prompt": "x", "image": "https://alice:s3cret@example.com/a.png"})
    detail = r.json()["error"]["details"][0]
    assert detail["field"] == "image" and "credentials" in detail["reason"]
    assert detail["value"] == "https://***@example.com/a.png"


def test_image_shape_errors_arrive_with_the_others() -> None:
    # Shape rules are schema rules: reported at once with every other bad field.
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": "", "image": "http://u:p@x.example/a.png",
                                        "mask_image": "data:image/svg+xml;base64,AA=="})
    errors = {e.field: e for e in field_errors(info.value)}
    assert set(errors) == {"prompt", "image", "mask_image"}
    assert "credentials" in errors["image"].reason
    assert errors["image"].value == "http://***@x.example/a.png"
    for ok in ("https://x.example/a.png", "http://93.184.216.34:8080/a?b=c",
               "data:image/jpeg;base64,AAAA", "DATA:IMAGE/JPG;BASE64,AAAA"):
        assert GenerateRequest.model_validate({"prompt": "x", "image": ok}).image == ok


def test_empty_image_string_means_no_image() -> None:
    # WaveSpeed's own example sends "image": "".
    req = GenerateRequest.model_validate({"prompt": "x", "image": ""})
    assert req.image is None and req.to_generation(1).mode == "text-to-image"


async def test_size_no_enabled_provider_supports_is_422(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    settings = make_settings(tmp_path, {"vibedream": vibedream_sim})
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={"prompt": "x", "size": "1536*1536"})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported"
        assert any(d["field"] == "vibedream" and "1536*1536" in d["reason"]
                   for d in err["details"])
        assert vibedream_sim.stats["submits"] == 0


async def test_no_provider_enabled_is_503(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {})
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={"prompt": "x"})
        assert r.status_code == 503
        assert "no provider is enabled" in r.json()["error"]["message"]
        ready = await c.get("/readyz")
        assert ready.status_code == 503
        assert "no API key" in ready.json()["providers"]["vibedream"]
