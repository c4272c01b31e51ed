"""Media uploads (WaveSpeed's upload routes, proxy/uploads.py): the signed single-use PUT
URL, the checks on what is uploaded (nothing kept when refused), serving, retention and
the sweep, and using an upload as a request image on any surface (a data URI upstream,
or with public_base_url the public URL)."""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio
import httpx
import pytest
from litestar.testing import AsyncTestClient
from PIL import Image

from common.media import OutboundGuard
from providers.simulators import SimulatorServer
from proxy.api.inputs import RequestImageChecker
from proxy.app import create_app
from proxy.schema import IMAGE_MAX_BYTES
from proxy.uploads import Ticket, UploadError, UploadStore, validate_image

from ._serve import RecordingTransport
from .conftest import make_settings

ADMIN = "uploads-admin-key"
UPLOADS = "/api/v3/media/uploads"
BINARY = "/api/v3/media/upload/binary"
SUBMIT = "/api/v3/wavespeed-ai/flux-dev"


def png(size: tuple[int, int] = (320, 256)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 80)).save(out, "PNG")
    return out.getvalue()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class PublicResolver:
    """Every name is a public address (the proxy's public host resolves in production)."""

    async def __call__(self, host: str, port: int) -> list[str]:
        return ["93.184.216.34"]


@dataclass
class Proxy:
    client: AsyncTestClient[Any]
    key: dict[str, str]
    media: Path
    upstream: RecordingTransport

    def files(self) -> list[Path]:
        return sorted(p for p in self.media.rglob("*") if p.is_file())

    async def ticket(self, size: int, filename: str = "cat.png", **extra: Any
                     ) -> httpx.Response:
        return await self.client.post(UPLOADS, json={"filename": filename, "size": size,
                                                     **extra}, headers=self.key)

    async def upload(self, data: bytes) -> str:
        """The SDK's two steps; the download URL."""
        r = await self.ticket(len(data), content_type="image/png")
        assert r.status_code == 200, r.text
        instruction = r.json()["data"]["upload"]
        put = await self.client.put(instruction["url"], content=data,
                                    headers=instruction["headers"])
        assert put.status_code == 200, put.text
        url: str = r.json()["data"]["download_url"]
        return url


@asynccontextmanager
async def proxy_with(tmp_path: Path, sim: SimulatorServer, **overrides: Any
                     ) -> AsyncIterator[Proxy]:
    media = tmp_path / "media"
    settings = make_settings(tmp_path, {"wavespeed": sim}, auth_enabled=True, admin_key=ADMIN,
                             media_dir=str(media), log_level="warning",
                             **{"public_base_url": "", **overrides})
    upstream = RecordingTransport()
    app = create_app(settings, transports={"wavespeed": upstream})
    app.state.image_checker = RequestImageChecker(
        guard=OutboundGuard(resolver=PublicResolver(), resolve_timeout_s=0.5))
    async with AsyncTestClient(app, base_url="http://proxy.test") as client:
        r = await client.post("/admin/keys", json={"name": "uploader"}, headers=bearer(ADMIN))
        assert r.status_code == 201, r.text
        yield Proxy(client, bearer(r.json()["key"]), media, upstream)


@pytest.fixture
async def proxy(tmp_path: Path, wavespeed_sim: SimulatorServer) -> AsyncIterator[Proxy]:
    async with proxy_with(tmp_path, wavespeed_sim) as p:
        yield p


# --------------------------------------------------------------------------- the routes


async def test_ticket_put_and_download(proxy: Proxy) -> None:
    data = png()
    r = await proxy.ticket(len(data), content_type="image/png")
    assert r.status_code == 200 and r.json()["code"] == 200
    ticket = r.json()["data"]
    assert ticket["upload"]["method"] == "PUT"
    assert ticket["upload"]["headers"] == {"Content-Type": "image/png"}
    put_url, download = ticket["upload"]["url"], ticket["download_url"]
    assert download.startswith("http://proxy.test/api/v3/media/files/")
    assert (await proxy.client.get(download)).status_code == 404  # nothing until the PUT
    # The SDK PUTs with only the instruction's headers: no Authorization.
    put = await proxy.client.put(put_url, content=data, headers=ticket["upload"]["headers"])
    assert put.status_code == 200, put.text
    got = await proxy.client.get(download)
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"] == "image/png"
    assert got.headers["x-content-type-options"] == "nosniff"
    peek = await proxy.client.head(download)
    assert peek.status_code == 200 and peek.headers["content-length"] == str(len(data))
    assert peek.headers["content-type"] == "image/png" and peek.content == b""
    # Single use: the same URL cannot replace the file.
    again = await proxy.client.put(put_url, content=png((300, 300)))
    assert again.status_code == 409 and again.json()["code"] == 409
    assert (await proxy.client.get(download)).content == data


async def test_the_put_url_is_a_signed_capability(proxy: Proxy) -> None:
    data = png()
    url = (await proxy.ticket(len(data))).json()["data"]["upload"]["url"]
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for changed in ({"size": str(len(data) + 1)}, {"expires": str(int(query["expires"]) + 9)},
                    {"signature": "0" * 64}, {"key": "key_someone_else"}):
        forged = f"{parts.path}?{urlencode({**query, **changed})}"
        r = await proxy.client.put(forged, content=data)
        assert r.status_code == 403 and r.json()["code"] == 403, changed
    r = await proxy.client.put(parts.path, content=data)  # no capability at all
    assert r.status_code == 403
    other_id = "0" * 32
    r = await proxy.client.put(f"{UPLOADS}/{other_id}?{parts.query}", content=data)
    assert r.status_code == 403  # the signature covers the id
    assert proxy.files() == []


async def test_size_mismatch_and_limits(proxy: Proxy) -> None:
    data = png()
    url = (await proxy.ticket(len(data) + 10)).json()["data"]["upload"]["url"]
    r = await proxy.client.put(url, content=data)  # Content-Length says len(data)
    assert r.status_code == 400 and "declared" in r.json()["message"]

    # A Content-Length that lies: the bytes are counted as they come.
    url = (await proxy.ticket(len(data))).json()["data"]["upload"]["url"]
    r = await proxy.client.put(url, content=data + b"x" * 64,
                               headers={"Content-Length": str(len(data))})
    assert r.status_code == 400 and "longer than the declared size" in r.json()["message"]

    r = await proxy.ticket(IMAGE_MAX_BYTES + 1)
    assert r.status_code == 413 and r.json()["code"] == 413
    assert str(IMAGE_MAX_BYTES) in r.json()["message"]
    r = await proxy.ticket(100, filename="clip.mp4", content_type="video/mp4")
    assert r.status_code == 400 and "content_type" in r.json()["message"]
    r = await proxy.client.post(UPLOADS, json={"filename": "a.png"}, headers=proxy.key)
    assert r.status_code == 400 and "size" in r.json()["message"]
    assert proxy.files() == []


async def test_not_an_image_is_refused_and_nothing_kept(proxy: Proxy) -> None:
    for junk in (b"hello, not an image at all" * 10, png()[:200]):  # text; a truncated PNG
        ticket = (await proxy.ticket(len(junk))).json()["data"]
        r = await proxy.client.put(ticket["upload"]["url"], content=junk)
        assert r.status_code == 400 and r.json()["code"] == 400, r.text
        assert "not an accepted image" in r.json()["message"]
        assert (await proxy.client.get(ticket["download_url"])).status_code == 404
    assert proxy.files() == []


async def test_binary_upload(proxy: Proxy) -> None:
    data = png()
    r = await proxy.client.post(BINARY, files={"file": ("photo.png", data, "image/png")},
                                headers=proxy.key)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    assert set(body["data"]) == {"type", "download_url", "filename", "size"}
    assert body["data"]["type"] == "image" and body["data"]["size"] == len(data)
    assert body["data"]["filename"] == "photo.png"
    assert (await proxy.client.get(body["data"]["download_url"])).content == data

    r = await proxy.client.post(BINARY, files={"file": ("photo.png", data, "image/png")})
    assert r.status_code == 401 and set(r.json()) == {"code", "message"}
    r = await proxy.client.post(UPLOADS, json={"filename": "a.png", "size": 10})
    assert r.status_code == 401 and r.json()["code"] == 401
    r = await proxy.client.post(BINARY, files={"file": ("notes.txt", b"plain text", "text/plain")},
                                headers=proxy.key)
    assert r.status_code == 400 and "not an accepted image" in r.json()["message"]
    r = await proxy.client.post(BINARY, files={"other": ("a.png", data, "image/png")},
                                headers=proxy.key)
    assert r.status_code == 400 and "file" in r.json()["message"]
    big = b"\0" * (IMAGE_MAX_BYTES + 1)
    r = await proxy.client.post(BINARY, files={"file": ("big.png", big, "image/png")},
                                headers=proxy.key)
    assert r.status_code == 413 and "Invalid parameter file" in r.json()["message"]
    assert len([p for p in proxy.files() if p.suffix == ".json"]) == 1


# --------------------------------------------------------------------------- uploads as inputs


async def test_an_upload_is_a_data_uri_upstream_on_every_surface(proxy: Proxy) -> None:
    data = png()
    url = await proxy.upload(data)
    r = await proxy.client.post("/v1/predictions", headers=proxy.key, json={
        "prompt": "native", "image": url, "mask_image": url, "size": "512*512"})
    assert r.status_code == 202, r.text
    r = await proxy.client.post(SUBMIT, headers=proxy.key,
                                json={"prompt": "wavespeed", "image": url})
    assert r.status_code == 200, r.text
    for _ in range(200):  # bounded: both submits reach the simulator
        if len(proxy.upstream.submits) >= 2:
            break
        await anyio.sleep(0.02)
    native, wavespeed = proxy.upstream.submits[:2]
    expected = "data:image/png;base64," + base64.b64encode(data).decode()
    assert native["image"] == native["mask_image"] == expected
    assert wavespeed["image"] == expected


async def test_unknown_upload_is_an_image_error(proxy: Proxy) -> None:
    missing = "http://proxy.test/api/v3/media/files/" + "ab" * 16 + ".png"
    r = await proxy.client.post("/v1/predictions", headers=proxy.key,
                                json={"prompt": "x", "image": missing})
    assert r.status_code == 422, r.text
    [detail] = r.json()["error"]["details"]
    assert detail["field"] == "image" and "no such upload" in detail["reason"]
    r = await proxy.client.post(SUBMIT, headers=proxy.key, json={"prompt": "x", "image": missing})
    assert r.status_code == 400 and r.json()["message"].startswith("Invalid parameter image")
    assert proxy.upstream.submits == []


async def test_expired_uploads_are_gone(tmp_path: Path, wavespeed_sim: SimulatorServer) -> None:
    async with proxy_with(tmp_path, wavespeed_sim, media_retention_s=0.3) as p:
        url = await p.upload(png())
        assert (await p.client.get(url)).status_code == 200
        await anyio.sleep(0.35)
        assert (await p.client.get(url)).status_code == 404
        r = await p.client.post("/v1/predictions", headers=p.key,
                                json={"prompt": "x", "image": url})
        assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "image"


async def test_with_public_base_url_the_public_url_goes_upstream(
        tmp_path: Path, wavespeed_sim: SimulatorServer) -> None:
    async with proxy_with(tmp_path, wavespeed_sim,
                          public_base_url="https://flux.example.com") as p:
        url = await p.upload(png())
        assert url.startswith("https://flux.example.com/api/v3/media/files/")
        r = await p.client.post(SUBMIT, headers=p.key, json={"prompt": "x", "image": url})
        assert r.status_code == 200, r.text
        # The same upload named by where this client reached us: the public URL goes up.
        internal = url.replace("https://flux.example.com", "http://proxy.test")
        r = await p.client.post("/v1/predictions", headers=p.key,
                                json={"prompt": "y", "image": internal})
        assert r.status_code == 202, r.text
        for _ in range(200):
            if len(p.upstream.submits) >= 2:
                break
            await anyio.sleep(0.02)
        assert [s["image"] for s in p.upstream.submits[:2]] == [url, url]


# --------------------------------------------------------------------------- the store


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_store_retention_sweep_and_single_use(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    store = UploadStore(tmp_path / "m", 100.0, clock=clock)
    data = png()
    info = await validate_image(data)
    ids = [f"{i:02x}" + "0" * 30 for i in range(4)]  # shards 00..03
    for upload_id in ids:
        await store.save(upload_id, data, info, key_id="key_1", filename="a.png")
    found = await store.read(ids[0])
    assert found is not None and found[1] == data and found[0].content_type == "image/png"
    with pytest.raises(UploadError) as taken:
        await store.save(ids[0], png((100, 100)), info, key_id=None, filename=None)
    assert taken.value.status == 409
    assert (await store.read(ids[0]))[1] == data  # type: ignore[index]

    clock.now += 101  # past retention: not served, even before any sweep
    assert await store.get(ids[1]) is None
    assert len(files_under(tmp_path / "m")) == 8
    assert store.sweep(shards=256, max_entries=3) == 3  # bounded work
    # An upload sweeps SWEEP_SHARDS shards from a random one: here from shard 00.
    monkeypatch.setattr("proxy.uploads.random.randrange", lambda n: 0)
    fresh = "ff" + "0" * 30
    await store.save(fresh, data, info, key_id=None, filename=None)
    assert [p.name for p in files_under(tmp_path / "m")] == [fresh, f"{fresh}.json"]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_a_half_written_upload_is_never_visible(tmp_path: Path) -> None:
    clock = Clock()
    store = UploadStore(tmp_path / "m", 100.0, clock=clock)
    upload_id = "cd" + "1" * 30
    shard = tmp_path / "m" / "cd"
    shard.mkdir(parents=True)
    (shard / f".{upload_id}.dead.tmp").write_bytes(png()[:50])  # a crash mid-write
    (shard / upload_id).write_bytes(png())  # a crash before the metadata
    assert await store.get(upload_id) is None and await store.read(upload_id) is None
    clock.now += 101
    assert store.sweep(shards=256) == 2


async def test_validation_limits() -> None:
    with pytest.raises(UploadError) as small:
        await validate_image(png((32, 32)))
    assert small.value.status == 400 and "at least 64" in small.value.message
    with pytest.raises(UploadError) as empty:
        await validate_image(b"")
    assert empty.value.status == 400


def test_ticket_expiry() -> None:
    secret = b"s" * 32
    ticket = Ticket.issue(10, "png", "key_1", now=1000.0)
    params = ticket.query(secret)
    assert Ticket.verify(ticket.upload_id, params, secret, now=1000.0) == ticket
    with pytest.raises(UploadError, match="expired"):
        Ticket.verify(ticket.upload_id, params, secret, now=1000.0 + 3601)
    with pytest.raises(UploadError, match="signature"):
        Ticket.verify(ticket.upload_id, params, b"t" * 32, now=1000.0)


def test_media_dir_is_made_on_demand(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    assert UploadStore(root, 10).sweep() == 0 and not os.path.exists(root)
