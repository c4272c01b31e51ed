"""Request images (`image`, `mask_image`) through POST /v1/predictions.

Every bad image is a 422 naming the field and the reason (and the allowed range
for size limits); nothing is written to the database and no provider is called.

No test resolves a real name or sends traffic anywhere but loopback: the proxy
gets a guard whose resolver is a table (unknown names fail the test), the
module's default checker is replaced by one that refuses to resolve at all,
address classes are tested as IP literals (checked, never connected to), and
the simulators never fetch the URLs they are given.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from litestar.testing import AsyncTestClient

from common.media import OutboundGuard, to_data_uri
from providers.simulators import SimConfig, SimulatorServer
from proxy.api import inputs
from proxy.api.inputs import RequestImageChecker
from proxy.app import create_app
from proxy.schema import IMAGE_MAX_PIXELS, IMAGE_MAX_SIDE, IMAGE_MIN_SIDE

from .conftest import make_settings
from .test_media import gif_with_header, make_image, png_with_header

pytestmark = pytest.mark.asyncio(loop_scope="module")

PUBLIC = "93.184.216.34"  # a public literal: checked, never contacted (simulators don't fetch)


@dataclass
class FakeResolver:
    """DNS as a table; records every question. Unknown names fail like NXDOMAIN."""

    table: dict[str, Sequence[str]] = field(default_factory=dict)
    delay_s: float = 0.0
    asked: list[tuple[str, int]] = field(default_factory=list)

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if host not in self.table:
            raise OSError(f"fake resolver: no such host {host}")
        return list(self.table[host])


RESOLVER = {
    "cdn.example": [PUBLIC],
    "v6.cdn.example": ["2606:2800:220:1:248:1893:25c8:1946"],
    "rebind.example": ["127.0.0.1"],
    "mixed.example": [PUBLIC, "10.0.0.7"],
    "v6loop.example": ["::1"],
    "mapped.example": ["::ffff:169.254.169.254"],
    "slow.example": [PUBLIC],
}


@pytest.fixture(autouse=True)
def _no_real_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever app a test builds, the default checker cannot reach real DNS."""

    async def refuse(host: str, port: int) -> list[str]:
        raise AssertionError(f"a test tried to resolve {host!r} for real")

    monkeypatch.setattr(inputs, "DEFAULT_CHECKER",
                        RequestImageChecker(guard=OutboundGuard(resolver=refuse)))


@dataclass
class Proxy:
    client: AsyncTestClient[Any]
    db: Path
    sims: tuple[SimulatorServer, ...]
    resolver: FakeResolver

    async def post(self, **fields: Any) -> Any:
        return await self.client.post("/v1/predictions", json={"prompt": "a lighthouse", **fields})

    def rows(self, table: str) -> int:
        with sqlite3.connect(self.db) as conn:
            (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(count)

    def assert_nothing_written_or_sent(self) -> None:
        assert self.rows("predictions") == 0
        assert self.rows("attempts") == 0
        for sim in self.sims:
            assert sim.stats["submits"] == 0


@asynccontextmanager
async def proxy_with(tmp_path: Path, sims: dict[str, SimulatorServer],
                     checker: RequestImageChecker | None = None,
                     resolver: FakeResolver | None = None) -> AsyncIterator[Proxy]:
    resolver = resolver or FakeResolver(dict(RESOLVER))
    app = create_app(make_settings(tmp_path, sims))
    app.state.image_checker = checker or RequestImageChecker(
        guard=OutboundGuard(resolver=resolver, resolve_timeout_s=0.5))
    async with AsyncTestClient(app, base_url="http://proxy.test") as client:
        yield Proxy(client, tmp_path / "proxy.db", tuple(sims.values()), resolver)


@pytest_asyncio.fixture(loop_scope="module")
async def proxy(tmp_path: Path, vibedream_sim: SimulatorServer,
                wavespeed_sim: SimulatorServer) -> AsyncIterator[Proxy]:
    """A fresh proxy (for requests that are accepted)."""
    # VibeDream first: a URL request goes there; data URIs fall through to WaveSpeed.
    async with proxy_with(tmp_path, {"vibedream": vibedream_sim,
                                     "wavespeed": wavespeed_sim}) as p:
        yield p


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def _shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Proxy]:
    with SimulatorServer("vibedream", SimConfig(job_latency_s=0.05)) as vd, \
            SimulatorServer("wavespeed", SimConfig(job_latency_s=0.05)) as ws:
        async with proxy_with(tmp_path_factory.mktemp("shared"),
                              {"vibedream": vd, "wavespeed": ws}) as p:
            yield p


@pytest.fixture
def bad(_shared: Proxy) -> Proxy:
    """One proxy for all requests that must be refused: it must stay empty, so a
    request wrongly accepted fails its test (and the ones after it)."""
    _shared.assert_nothing_written_or_sent()
    _shared.resolver.asked.clear()
    return _shared


def b64(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png(size: tuple[int, int] = (128, 128)) -> str:
    return to_data_uri(make_image("png", size), "png")


JPEG = make_image("jpeg", (256, 256))
PNG_B64 = base64.b64encode(make_image("png", (128, 128))).decode()
SVG = b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>"


def detail(r: Any, field_name: str) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "validation_error"
    return next(d for d in err["details"] if d["field"] == field_name)


# --------------------------------------------------------------------------- inline images

BAD_INLINE: list[tuple[str, str, str]] = [
    ("not-an-image", b64("image/png", b"hello, I am text"), "not a JPEG/PNG/GIF/WebP image"),
    ("html", b64("image/png", b"<html><body>x</body></html>"), "not a JPEG/PNG/GIF/WebP"),
    ("bad-base64", "data:image/png;base64,!!!not base64!!!", "not valid base64"),
    ("b64-whitespace", "data:image/png;base64," + PNG_B64[:40] + "\n" + PNG_B64[40:],
     "not valid base64"),
    ("b64-unpadded", "data:image/png;base64," + PNG_B64.rstrip("=") + "A", "not valid base64"),
    ("b64-urlsafe", "data:image/png;base64," + PNG_B64.replace("+", "-").replace("/", "_"),
     "not valid base64"),
    ("b64-percent", "data:image/png;base64," + PNG_B64.replace("+", "%2B"), "not valid base64"),
    ("not-base64", "data:image/png,%89PNG%0D%0A%1A%0A", "data:image/png;base64"),
    ("svg", b64("image/svg+xml", SVG), "not accepted"),
    ("text-type", b64("text/plain", b"hello"), "not accepted"),
    ("bmp", b64("image/bmp", b"BM" + b"\x00" * 60), "not accepted"),
    ("svg-labelled-png", b64("image/png", SVG), "not a JPEG/PNG/GIF/WebP"),
    ("jpeg-labelled-png", b64("image/png", JPEG), "declares image/png but its bytes are a JPEG"),
    ("half-jpeg", b64("image/jpeg", JPEG[: len(JPEG) // 2]), "corrupt or truncated"),
    ("jpeg-no-tail", b64("image/jpeg", JPEG[:-64]), "corrupt or truncated"),
    ("empty-payload", "data:image/png;base64,", "empty"),
]


@pytest.mark.parametrize(("case", "value", "reason"), BAD_INLINE,
                         ids=[c for c, _, _ in BAD_INLINE])
async def test_bad_inline_image_is_422(bad: Proxy, case: str, value: str, reason: str) -> None:
    r = await bad.post(image=value)
    d = detail(r, "image")
    assert reason in d["reason"], d
    assert d["allowed"]
    bad.assert_nothing_written_or_sent()


@pytest.mark.parametrize("fmt", ["jpeg", "png", "gif", "webp"])
async def test_truncated_image_of_each_format_is_422(bad: Proxy, fmt: str) -> None:
    data = make_image(fmt, (160, 160))
    r = await bad.post(image=to_data_uri(data[: len(data) // 2], fmt))
    assert "not a valid" in detail(r, "image")["reason"]
    bad.assert_nothing_written_or_sent()


SIZE_LIMITS: list[tuple[str, bytes, str]] = [
    ("png-50000x50000", png_with_header(50_000, 50_000), "50000x50000"),  # past Pillow's own
    ("png-10000x10000", png_with_header(10_000, 10_000), "10000x10000"),  # Pillow would warn
    ("png-4097-wide", png_with_header(IMAGE_MAX_SIDE + 1, 100), "at most 4096"),
    ("png-4096x4097", png_with_header(4096, 4096 + 1), "at most 4096"),
    ("png-20000x1", png_with_header(20_000, 1), "at most 4096"),
    ("gif-65535", gif_with_header(65_535, 65_535), "65535x65535"),
    ("tiny-png", make_image("png", (IMAGE_MIN_SIDE - 1, 200)), f"at least {IMAGE_MIN_SIDE}"),
    ("zero-size", png_with_header(0, 10), "not a valid PNG"),
]


@pytest.mark.parametrize(("case", "data", "reason"), SIZE_LIMITS,
                         ids=[c for c, _, _ in SIZE_LIMITS])
async def test_image_dimensions_outside_limits_are_422_with_range(
    bad: Proxy, case: str, data: bytes, reason: str
) -> None:
    fmt = "gif" if data.startswith(b"GIF") else "png"
    started = time.monotonic()
    r = await bad.post(image=to_data_uri(data, fmt))
    d = detail(r, "image")
    assert reason in d["reason"], d
    if case != "zero-size":
        assert d["allowed"] == (f"each side {IMAGE_MIN_SIDE}..{IMAGE_MAX_SIDE} pixels, at most "
                                f"{IMAGE_MAX_PIXELS} pixels in all, at most 12582912 bytes")
    assert time.monotonic() - started < 2  # refused from the header: nothing was decoded
    bad.assert_nothing_written_or_sent()


async def test_pixel_limit_is_not_only_the_side_limit(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    checker = RequestImageChecker(guard=OutboundGuard(resolver=FakeResolver()),
                                  max_pixels=100 * 100)
    async with proxy_with(tmp_path, {"wavespeed": wavespeed_sim}, checker) as p:
        r = await p.post(image=png((101, 100)))
        d = detail(r, "image")
        assert "at most 10000 pixels" in d["reason"]
        assert "at most 10000 pixels in all" in d["allowed"]
        p.assert_nothing_written_or_sent()
        assert (await p.post(image=png((100, 100)))).status_code == 202


async def test_decoded_byte_limit(tmp_path: Path, wavespeed_sim: SimulatorServer) -> None:
    checker = RequestImageChecker(guard=OutboundGuard(resolver=FakeResolver()), max_bytes=2000)
    async with proxy_with(tmp_path, {"wavespeed": wavespeed_sim}, checker) as p:
        r = await p.post(image=png((128, 128)))
        d = detail(r, "image")
        assert "exceeds 2000 bytes" in d["reason"]
        assert "at most 2000 bytes" in d["allowed"]
        p.assert_nothing_written_or_sent()


@pytest.mark.parametrize("fmt", ["jpeg", "png", "gif", "webp"])
async def test_real_inline_images_are_accepted(proxy: Proxy, fmt: str,
                                               wavespeed_sim: SimulatorServer) -> None:
    data = make_image(fmt, (IMAGE_MIN_SIDE, 96))
    r = await proxy.post(image=to_data_uri(data, fmt))
    assert r.status_code == 202, r.text
    assert proxy.rows("predictions") == 1


async def test_jpg_alias_and_parameters_in_the_label(proxy: Proxy) -> None:
    uri = "data:image/JPG;name=in.jpg;base64," + base64.b64encode(JPEG).decode()
    assert (await proxy.post(image=uri)).status_code == 202


async def test_long_data_uri_is_not_echoed_whole(bad: Proxy) -> None:
    r = await bad.post(image=b64("image/png", b"x" * 5000))
    value = detail(r, "image")["value"]
    assert len(value) < 150 and value.startswith("data:image/png;base64,")


# --------------------------------------------------------------------------- masks


async def test_inline_image_with_same_size_mask_is_accepted(proxy: Proxy) -> None:
    r = await proxy.post(image=png((128, 96)),
                         mask_image=to_data_uri(make_image("gif", (128, 96)), "gif"))
    assert r.status_code == 202, r.text


@pytest.mark.parametrize(
    ("mask", "reason"),
    [
        (b64("image/png", b"nope"), "not a JPEG/PNG/GIF/WebP"),
        (b64("image/svg+xml", SVG), "not accepted"),
        (b64("image/jpeg", JPEG[:200]), "corrupt or truncated"),
        ("data:image/png;base64,%%%", "not valid base64"),
        (png((128, 97)), "mask is 128x97 pixels but image is 128x96"),
        (to_data_uri(png_with_header(30_000, 30_000), "png"), "at most 4096"),
        ("http://127.1/m.png", "loopback"),
    ],
    ids=["not-image", "svg", "truncated", "bad-base64", "other-size", "bomb", "loopback-url"],
)
async def test_bad_mask_is_422_naming_mask_image(bad: Proxy, mask: str, reason: str) -> None:
    r = await bad.post(image=png((128, 96)), mask_image=mask)
    d = detail(r, "mask_image")
    assert reason in d["reason"], d
    assert [e["field"] for e in r.json()["error"]["details"]] == ["mask_image"]
    bad.assert_nothing_written_or_sent()


async def test_mask_without_image_is_422(bad: Proxy) -> None:
    r = await bad.post(mask_image=png())
    assert "needs image" in detail(r, "mask_image")["reason"]
    bad.assert_nothing_written_or_sent()


async def test_bad_image_and_bad_mask_are_both_reported(bad: Proxy) -> None:
    r = await bad.post(image=b64("image/png", b"text"), mask_image="http://10.0.0.1/m.png")
    fields = sorted(d["field"] for d in r.json()["error"]["details"])
    assert r.status_code == 422 and fields == ["image", "mask_image"]
    bad.assert_nothing_written_or_sent()


async def test_url_image_with_inline_mask_skips_the_size_rule(proxy: Proxy) -> None:
    # Rule: sizes are compared only when both are inline (URLs are not fetched here).
    r = await proxy.post(image=f"http://{PUBLIC}/in.png", mask_image=png((200, 100)))
    assert r.status_code == 202, r.text


# --------------------------------------------------------------------------- URLs

BAD_LITERAL_URLS = [
    # IPv4 loopback in every spelling a resolver reads
    "http://127.0.0.1/x.png", "http://127.1/x.png", "http://0x7f.1/x.png",
    "http://0x7f000001/x.png", "http://2130706433/x.png", "http://017700000001/x.png",
    "http://127.0.0.1./x.png", "http://127.8.9.10:8080/x.png",
    # unspecified, private, link-local / metadata, CGNAT, multicast, reserved, broadcast
    "http://0.0.0.0/x.png", "http://0/x.png", "http://10.0.0.1/x.png", "http://10.1/x.png",
    "http://172.16.0.1/x.png", "http://192.168.1.1/x.png", "http://169.254.169.254/latest/",
    "http://100.64.0.1/x.png", "http://224.0.0.1/x.png", "http://240.0.0.1/x.png",
    "http://255.255.255.255/x.png", "http://192.0.2.1/x.png",
    # IPv6
    "http://[::1]/x.png", "http://[::]/x.png", "http://[::ffff:127.0.0.1]/x.png",
    "http://[::ffff:7f00:1]/x.png", "http://[::ffff:10.0.0.1]/x.png", "http://[fc00::1]/x.png",
    "http://[fd12:3456::1]/x.png", "http://[fe80::1]/x.png", "http://[fe80::1%25eth0]/x.png",
    "http://[fec0::1]/x.png", "http://[ff02::1]/x.png", "http://[64:ff9b::7f00:1]/x.png",
    "http://[2002:7f00:1::]/x.png", "http://[fd00:ec2::254]/x.png",
]


@pytest.mark.parametrize("url", BAD_LITERAL_URLS)
async def test_internal_address_literals_are_422(bad: Proxy, url: str) -> None:
    r = await bad.post(image=url)
    d = detail(r, "image")
    assert " is a" in d["reason"] and "address" in d["reason"], d
    assert bad.resolver.asked == []  # refused by literal: no DNS question at all
    bad.assert_nothing_written_or_sent()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://user:pw@cdn.example/x.png", "credentials"),
        ("http://user@cdn.example/x.png", "credentials"),
        ("https://:secret@cdn.example/x.png", "credentials"),
        (f"http://{PUBLIC}:80@cdn.example/x.png", "credentials"),
        ("ftp://cdn.example/x.png", "http(s) URL"),
        ("file:///etc/passwd", "http(s) URL"),
        ("gopher://cdn.example/", "http(s) URL"),
        ("javascript:alert(1)", "http(s) URL"),
        ("//cdn.example/x.png", "http(s) URL"),
        ("http:///x.png", "no host"),
        ("http://0177.0.0.1/x.png", "malformed"),  # httpx refuses octal; so do we
        ("https://cdn.example/" + "a" * 5000, "longer than 4096"),
    ],
)
async def test_url_shape_rules_are_422(bad: Proxy, url: str, reason: str) -> None:
    r = await bad.post(image=url)
    d = detail(r, "image")
    assert reason in d["reason"], d
    assert "pw" not in str(d["value"]) and "secret" not in str(d["value"])
    assert bad.resolver.asked == []
    bad.assert_nothing_written_or_sent()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://rebind.example/x.png", "resolves to a loopback address"),
        ("https://mixed.example/x.png", "resolves to a private address"),
        ("https://v6loop.example/x.png", "resolves to a loopback address"),
        ("https://mapped.example/x.png", "resolves to an IPv6 address embedding"),
        ("https://nowhere.example/x.png", "could not resolve"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ],
)
async def test_hostnames_resolving_inside_are_422(bad: Proxy, url: str, reason: str) -> None:
    r = await bad.post(image=url)
    d = detail(r, "image")
    assert reason in d["reason"], d
    assert "10.0.0.7" not in d["reason"]  # the internal answer stays in our logs
    bad.assert_nothing_written_or_sent()


async def test_resolution_is_bounded_in_time(tmp_path: Path,
                                             vibedream_sim: SimulatorServer) -> None:
    slow = FakeResolver(dict(RESOLVER), delay_s=5.0)
    checker = RequestImageChecker(guard=OutboundGuard(resolver=slow, resolve_timeout_s=0.2))
    async with proxy_with(tmp_path, {"vibedream": vibedream_sim}, checker, slow) as p:
        started = time.monotonic()
        r = await p.post(image="https://slow.example/x.png")
        assert time.monotonic() - started < 2
        assert "timed out resolving" in detail(r, "image")["reason"]
        p.assert_nothing_written_or_sent()


async def test_public_urls_are_accepted_and_sent_as_given(
    proxy: Proxy, vibedream_sim: SimulatorServer
) -> None:
    r = await proxy.post(image="https://cdn.example/in.png",
                         mask_image="https://v6.cdn.example/mask.png")
    assert r.status_code == 202, r.text
    assert sorted(proxy.resolver.asked) == [("cdn.example", 443), ("v6.cdn.example", 443)]
    r = await proxy.post(image=f"http://{PUBLIC}:8080/in.png")
    assert r.status_code == 202, r.text
    assert proxy.rows("predictions") == 2


# --------------------------------------------------------------------------- per provider


async def test_inline_image_needs_a_provider_that_takes_data_uris(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    async with proxy_with(tmp_path, {"vibedream": vibedream_sim}) as p:
        r = await p.post(image=png())
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported"
        assert any(d["field"] == "vibedream" and "public http(s) URL" in d["reason"]
                   for d in err["details"])
        p.assert_nothing_written_or_sent()
        r = await p.post(image="https://cdn.example/in.png")
        assert r.status_code == 202, r.text


async def test_the_default_checker_is_strict() -> None:
    checker = RequestImageChecker()
    assert checker.guard.allow_private is False
    assert not checker.guard.allowed_hosts and checker.guard.resolver is None
    assert checker.guard.resolve_timeout_s <= 5
    assert (checker.min_side, checker.max_side, checker.max_pixels) == (
        IMAGE_MIN_SIDE, IMAGE_MAX_SIDE, IMAGE_MAX_PIXELS)
