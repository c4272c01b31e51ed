"""Outputs the proxy keeps (`output_store`, proxy/outputs_store/): copied from the
providers as predictions complete, listed as the proxy's URLs on every surface, served
to the key that may see the prediction, kept when the provider is gone, left at the
provider's URL when a copy fails, and deleted by the retention sweep. Everything talks
to 127.0.0.1 only (the simulators; the proxy runs in process)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from providers.simulators import SimConfig, SimulatorServer
from proxy.config import Settings
from proxy.metrics import REGISTRY
from proxy.outputs_store import LocalFolder, OutputStore, open_store
from proxy.outputs_store.backend import put_whole

from .conftest import make_settings, running_proxy

ADMIN = "outputs-admin-key"
BASE = "http://proxy.test"
PNG_BODY = {"prompt": "a lighthouse at dusk", "size": "512*512", "num_images": 2,
            "output_format": "png", "seed": 7, "enable_sync_mode": True}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def copies(result: str) -> float:
    return REGISTRY.get_sample_value("flux_proxy_output_copies_total",
                                     {"result": result}) or 0.0


def kept_settings(tmp_path: Path, sim: SimulatorServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"output_store": str(tmp_path / "outputs"),
                              "auth_enabled": True, "admin_key": ADMIN}
    return make_settings(tmp_path, {"wavespeed": sim}, **(values | overrides))


async def new_key(c: Any, name: str) -> dict[str, str]:
    r = await c.post("/admin/keys", json={"name": name}, headers=bearer(ADMIN))
    assert r.status_code == 201, r.text
    return bearer(r.json()["key"])


def served_by_simulator(sim: SimulatorServer, upstream_id: str) -> list[tuple[bytes, str]]:
    """What the simulator itself serves for a task: each output's bytes and type."""
    result = httpx.get(f"{sim.base_url}/api/v3/predictions/{upstream_id}/result",
                       headers=bearer("sim-key"), timeout=5).json()["data"]
    out = []
    for url in result["outputs"]:
        assert url.startswith("http://127.0.0.1:")
        r = httpx.get(url, timeout=5)
        assert r.status_code == 200
        out.append((r.content, r.headers["content-type"]))
    return out


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def stored_files(tmp_path: Path) -> list[Path]:
    return files_under(tmp_path / "outputs")



def bare(url: str) -> str:
    """A listed output URL without its signature."""
    return url.split("?", 1)[0]

async def test_outputs_are_kept_listed_and_served_to_their_key_only(tmp_path: Path) -> None:
    stored_before = copies("stored")
    with SimulatorServer("wavespeed", SimConfig(job_latency_s=0.05)) as sim:
        async with running_proxy(kept_settings(tmp_path, sim)) as c:
            owner, other = await new_key(c, "owner"), await new_key(c, "other")
            r = await c.post("/v1/predictions", json=PNG_BODY, headers=owner)
            assert r.status_code == 200, r.text
            pred = r.json()
            pid = pred["id"]
            paths = [f"/v1/predictions/{pid}/outputs/{n}" for n in range(2)]
            urls = pred["outputs"]  # signed: ?expires=...&sig=...
            assert pred["status"] == "completed" and [bare(u) for u in urls] == [
                BASE + p for p in paths]
            assert copies("stored") == stored_before + 2
            expected = served_by_simulator(sim, pred["attempts"][0]["upstream_id"])
            assert [t for _, t in expected] == ["image/png", "image/png"]

            # Every surface lists the proxy's URLs.
            got = (await c.get(f"/v1/predictions/{pid}", headers=owner)).json()
            assert got["outputs"] == urls
            listed = (await c.get("/v1/predictions", headers=owner)).json()["data"]
            assert listed[0]["outputs"] == urls
            ws = (await c.get(f"/api/v3/predictions/{pid}/result", headers=owner)).json()
            assert ws["data"]["outputs"] == urls
            vd = (await c.get(f"/api/v1/predictions/{pid}", headers=owner)).json()
            assert vd["outputs"] == urls
            oa = await c.post("/v1/images/generations", headers=owner, json={
                "model": "flux-dev", "prompt": "a red fox", "size": "512x512", "n": 1})
            assert oa.status_code == 200, oa.text
            oa_id = oa.headers["x-flux-prediction-id"]
            [oa_image] = oa.json()["data"]
            assert bare(oa_image["url"]) == f"{BASE}/v1/predictions/{oa_id}/outputs/0"

            # The bytes the simulator served, with its content type, to the owner;
            # not gzipped (images are compressed already).
            for n, (data, ctype) in enumerate(expected):
                out = await c.get(urls[n], headers={**owner, "Accept-Encoding": "gzip"})
                assert out.status_code == 200
                assert out.content == data and out.headers["content-type"] == ctype
                assert out.headers["content-length"] == str(len(data))
                assert "content-encoding" not in out.headers
            admin = await c.get(urls[0], headers=bearer(ADMIN))
            assert admin.status_code == 200 and admin.content == expected[0][0]

            # The listed (signed) URL needs no key, as SDKs fetch image URLs bare; the
            # signature is for that path and expiry only.
            signed = await c.get(urls[0])
            assert signed.status_code == 200 and signed.content == expected[0][0]
            path0, query = urls[0].removeprefix(BASE).split("?")
            assert (await c.get(f"{paths[1]}?{query}")).status_code == 401  # another output
            tampered = query[:-2] + ("AA" if not query.endswith("AA") else "BB")
            assert (await c.get(f"{path0}?{tampered}")).status_code == 401
            later = query.replace("expires=", "expires=1")  # a later expiry: not signed
            assert (await c.get(f"{path0}?{later}")).status_code == 401
            # Without the signature: another key, no key, an index out of range, a
            # made-up id: 404 / 401.
            assert (await c.get(paths[0], headers=other)).status_code == 404
            assert (await c.get(paths[0])).status_code == 401
            for n in ("2", "16", "-1", "+0", "x", "0x0", "1.0"):
                path = f"/v1/predictions/{pid}/outputs/{n}"
                assert (await c.get(path, headers=owner)).status_code == 404, n
            for bad in ("..%2F..%2Fetc", "00000000-0000-7000-8000-000000000000"):
                r = await c.get(f"/v1/predictions/{bad}/outputs/0", headers=owner)
                assert r.status_code == 404, bad
            assert len(stored_files(tmp_path)) == 3

        sim.stop()  # the provider is gone: its URLs would fail now, the proxy's do not
        async with httpx.AsyncClient(timeout=2) as h:
            with pytest.raises(httpx.TransportError):
                await h.get(f"{sim.base_url}/healthz")
        async with running_proxy(kept_settings(tmp_path, sim)) as c:
            for n, (data, _) in enumerate(expected):
                out = await c.get(urls[n], headers=owner)
                assert out.status_code == 200 and out.content == data


async def test_an_output_over_the_cap_keeps_the_provider_url(
        tmp_path: Path, wavespeed_sim: SimulatorServer) -> None:
    before = copies("too_large")
    settings = kept_settings(tmp_path, wavespeed_sim, output_store_max_bytes=4096)
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", headers=bearer(ADMIN), json={
            "prompt": "a fox", "size": "512*512", "output_format": "jpeg",  # ~6 KB
            "enable_sync_mode": True})
        pred = r.json()
        assert pred["status"] == "completed"
        [url] = pred["outputs"]
        assert url.startswith(f"{wavespeed_sim.base_url}/assets/")  # the provider's
        async with httpx.AsyncClient(timeout=5) as h:
            assert (await h.get(url)).status_code == 200
        assert copies("too_large") == before + 1
        got = await c.get(f"/v1/predictions/{pred['id']}/outputs/0", headers=bearer(ADMIN))
        assert got.status_code == 404
    assert stored_files(tmp_path) == []


async def test_a_store_that_cannot_be_written_keeps_the_provider_urls(
        tmp_path: Path, wavespeed_sim: SimulatorServer) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    before = copies("store_failed")
    settings = kept_settings(tmp_path, wavespeed_sim, output_store=str(blocker))
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json=PNG_BODY, headers=bearer(ADMIN))
        pred = r.json()
    assert pred["status"] == "completed" and len(pred["outputs"]) == 2
    assert all(u.startswith(f"{wavespeed_sim.base_url}/assets/") for u in pred["outputs"])
    assert copies("store_failed") == before + 2


async def test_a_copy_slower_than_its_timeout_keeps_the_provider_url(
        tmp_path: Path, wavespeed_sim: SimulatorServer) -> None:
    before = copies("timeout")
    settings = kept_settings(tmp_path, wavespeed_sim, output_copy_timeout_s=0.2)
    wavespeed_sim.config.asset_latency_s = 2.0  # the image host stalls
    async with running_proxy(settings) as c:
        started = time.monotonic()
        r = await c.post("/v1/predictions", headers=bearer(ADMIN), json={
            "prompt": "a fox", "size": "512*512", "enable_sync_mode": True})
        took = time.monotonic() - started
    pred = r.json()
    assert pred["status"] == "completed" and took < 1.5  # bounded by the copy timeout
    assert pred["outputs"][0].startswith(f"{wavespeed_sim.base_url}/assets/")
    assert copies("timeout") == before + 1


async def test_base64_outputs_and_a_store_that_is_off_are_left_alone(
        tmp_path: Path, wavespeed_sim: SimulatorServer) -> None:
    async with running_proxy(kept_settings(tmp_path, wavespeed_sim)) as c:
        r = await c.post("/v1/predictions", headers=bearer(ADMIN), json={
            **PNG_BODY, "enable_base64_output": True})
        assert all(o.startswith("data:image/png;base64,") for o in r.json()["outputs"])
    assert stored_files(tmp_path) == []

    off = make_settings(tmp_path, {"wavespeed": wavespeed_sim})  # output_store unset
    assert open_store(off) is None
    async with running_proxy(off) as c:
        pred = (await c.post("/v1/predictions", json=PNG_BODY)).json()
        assert all(u.startswith(wavespeed_sim.base_url) for u in pred["outputs"])
        got = await c.get(f"/v1/predictions/{pred['id']}/outputs/0")
        assert got.status_code == 404


async def test_the_sweeper_deletes_outputs_past_retention(
        tmp_path: Path, wavespeed_sim: SimulatorServer) -> None:
    settings = kept_settings(tmp_path, wavespeed_sim, output_retention_s=3600,
                             output_sweep_interval_s=0.05)
    async with running_proxy(settings) as c:
        old = (await c.post("/v1/predictions", json=PNG_BODY, headers=bearer(ADMIN))).json()
        new = (await c.post("/v1/predictions", json=PNG_BODY, headers=bearer(ADMIN))).json()
        assert (await c.get(old["outputs"][0], headers=bearer(ADMIN))).status_code == 200
        # The first one's files were written two hours ago, as far as the store can tell.
        aged = [p for p in stored_files(tmp_path) if old["id"] in str(p)]
        assert len(aged) == 2
        past = time.time() - 7200
        for path in aged:
            os.utime(path, (past, past))
        for _ in range(250):  # bounded: 5 s
            if not any(p.exists() for p in aged):
                break
            await anyio.sleep(0.02)
        assert not any(p.exists() for p in aged)
        assert not aged[0].parent.exists()  # its folder too
        for url in old["outputs"]:
            assert (await c.get(url, headers=bearer(ADMIN))).status_code == 404
        for url in new["outputs"]:
            assert (await c.get(url, headers=bearer(ADMIN))).status_code == 200
        # The prediction itself stays (its outputs are the proxy's URLs, now 404).
        again = (await c.get(f"/v1/predictions/{old['id']}", headers=bearer(ADMIN))).json()
        assert again["outputs"] == old["outputs"]


PID = "01a20104-1b2c-7d3e-9f40-0123456789ab"


async def test_the_store_hides_and_sweeps_what_is_past_retention(tmp_path: Path) -> None:
    now = [time.time()]
    store = OutputStore(LocalFolder(tmp_path), max_bytes=1 << 20, retention_s=60,
                        copy_timeout_s=5, sweep_interval_s=60, clock=lambda: now[0])
    data = b"\x89PNG\r\n\x1a\n" + b"x" * 100
    await put_whole(store.backend, PID, 0, data, "png")
    blob = await store.open(PID, 0)
    assert blob is not None and blob.content_type == "image/png" and blob.size == len(data)
    assert b"".join([c async for c in blob.chunks]) == data
    assert await store.sweep() == 0  # not yet
    now[0] += 61
    assert await store.open(PID, 0) is None  # past retention: hidden before any sweep
    assert await store.sweep() == 1
    assert files_under(tmp_path) == []
    # Names a request could steer never reach the folder.
    for bad_id, n in (("../../etc/passwd", 0), (PID.upper(), 0), (PID, -1), (PID, 99)):
        assert await store.open(bad_id, n) is None


def test_output_store_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLUX_PROXY_OUTPUT_STORE", f"file://{tmp_path}/o")
    store = open_store(Settings())
    assert isinstance(store, OutputStore) and isinstance(store.backend, LocalFolder)
    assert store.backend.root == tmp_path / "o"
    monkeypatch.setenv("FLUX_PROXY_OUTPUT_STORE", "")
    assert Settings().output_store is None
    for bad in ("s3://", "https://bucket.example/x"):
        monkeypatch.setenv("FLUX_PROXY_OUTPUT_STORE", bad)
        with pytest.raises(ValueError, match="output_store"):
            Settings()


# --------------------------------------------------------------------------- S3


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's S3 in server mode on a free 127.0.0.1 port; a bucket `flux-outputs`."""
    boto3 = pytest.importorskip("boto3", reason="the [s3] extra (boto3) is not installed")
    moto_server = pytest.importorskip("moto.server",
                                      reason="moto[server] (the test extra) is not installed")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="flux-outputs")
    client.put_object(Bucket="flux-outputs", Key="kept/not-an-output.txt", Body=b"keep me")
    try:
        yield endpoint, client
    finally:
        client.close()
        server.stop()


async def test_outputs_kept_in_an_s3_bucket(tmp_path: Path, s3_server: Any,
                                            wavespeed_sim: SimulatorServer) -> None:
    endpoint, s3 = s3_server
    assert endpoint.startswith("http://127.0.0.1:")
    settings = kept_settings(tmp_path, wavespeed_sim, output_store="s3://flux-outputs/kept",
                             output_store_s3_endpoint_url=endpoint)
    async with running_proxy(settings) as c:
        pred = (await c.post("/v1/predictions", json=PNG_BODY, headers=bearer(ADMIN))).json()
        pid = pred["id"]
        assert [bare(u) for u in pred["outputs"]] == [
            f"{BASE}/v1/predictions/{pid}/outputs/{n}" for n in (0, 1)]
        expected = served_by_simulator(wavespeed_sim, pred["attempts"][0]["upstream_id"])
        for n, (data, ctype) in enumerate(expected):
            out = await c.get(pred["outputs"][n], headers=bearer(ADMIN))
            assert out.status_code == 200, out.text
            assert out.content == data and out.headers["content-type"] == ctype
            head = s3.head_object(Bucket="flux-outputs", Key=f"kept/{pid}/{n}")
            assert head["ContentType"] == ctype and head["ContentLength"] == len(data)

        # Past retention: hidden at once, then deleted by a sweep (other objects stay).
        store = c.app.state.output_store
        store.clock = lambda: time.time() + settings.output_retention_s + 60
        assert (await c.get(pred["outputs"][0], headers=bearer(ADMIN))).status_code == 404
        assert await store.sweep() == 2
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="flux-outputs")["Contents"]]
        assert keys == ["kept/not-an-output.txt"]


def test_the_compose_stack_keeps_outputs_on_a_volume() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a litestar dependency) reads the YAML")
    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    proxy = compose["services"]["proxy"]
    folder = proxy["environment"]["FLUX_PROXY_OUTPUT_STORE"].split("-", 1)[1].rstrip("}")
    assert folder == "/data/outputs"
    assert f"proxy-outputs:{folder}" in proxy["volumes"] and "proxy-outputs" in compose["volumes"]
    # The image makes the folder, owned by its user, so the volume starts writable.
    assert f"mkdir -p /data/media {folder}" in (root / "Dockerfile").read_text()


def test_a_signature_covers_one_path_until_its_expiry() -> None:
    from proxy.outputs_store import signing

    key = signing.derive_key(b"key-hash-secret")
    assert key != signing.derive_key(b"another secret")
    path = "/v1/predictions/01a2/outputs/0"
    url = signing.signed(key, path, 2_000)
    query = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    assert signing.valid(key, path, query["expires"], query["sig"], now=1_999.0)
    assert not signing.valid(key, path, query["expires"], query["sig"], now=2_000.0)  # expired
    assert not signing.valid(key, path.replace("/0", "/1"), query["expires"], query["sig"],
                             now=1_000.0)
    assert not signing.valid(signing.derive_key(b"x"), path, query["expires"], query["sig"],
                             now=1_000.0)
    for bad in ("", "-1", "2e3", "9" * 13):
        assert not signing.valid(key, path, bad, query["sig"], now=0.0)


async def test_unsigned_urls_when_signing_is_off(tmp_path: Path,
                                                 wavespeed_sim: SimulatorServer) -> None:
    settings = kept_settings(tmp_path, wavespeed_sim, output_signed_urls=False)
    async with running_proxy(settings) as c:
        pred = (await c.post("/v1/predictions", json=PNG_BODY, headers=bearer(ADMIN))).json()
        assert all("?" not in u for u in pred["outputs"])
        assert (await c.get(pred["outputs"][0])).status_code == 401
        assert (await c.get(pred["outputs"][0], headers=bearer(ADMIN))).status_code == 200
