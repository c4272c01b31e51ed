"""common.media: sniffing, decoding, data URIs, host patterns, the SSRF guard, downloads.

Network use is loopback only: downloads go to an in-test HTTP server on
127.0.0.1; guard checks for public addresses use IP literals (no DNS, no
traffic); hostnames other than ``localhost`` go through a stub resolver.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import ipaddress
import random
import struct
import time
import warnings
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

import httpx
import pytest
from PIL import Image

from common.media import (
    BlockedURL,
    ImageInfo,
    MediaError,
    OutboundGuard,
    Target,
    TooLarge,
    address_refusal,
    b64_to_data_uri,
    download,
    download_to,
    fetch_image,
    host_matches,
    inspect_data_uri,
    inspect_image,
    parse_data_uri,
    parse_ip_literal,
    sniff_format,
    to_data_uri,
)

FORMATS = ["jpeg", "png", "webp", "gif"]


# --------------------------------------------------------------------------- images


def make_image(fmt: str, size: tuple[int, int] = (48, 32)) -> bytes:
    """Real bytes from Pillow; noise so the compressed stream is not trivial."""
    rnd = random.Random(1234)
    image = Image.frombytes("RGB", size, rnd.randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper())
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def png_with_header(width: int, height: int) -> bytes:
    """A structurally valid PNG whose IHDR claims ``width`` x ``height`` (tiny IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _chunk(b"IEND", b"")
    )


def gif_with_header(width: int, height: int) -> bytes:
    screen = struct.pack("<HH", width, height) + b"\x00\x00\x00"
    descriptor = b"," + struct.pack("<HHHH", 0, 0, width, height) + b"\x00"
    return b"GIF89a" + screen + descriptor + b"\x02\x02\x44\x01\x00" + b";"


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {fmt: make_image(fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_sniff_and_inspect_real_images(images: dict[str, bytes], fmt: str) -> None:
    data = images[fmt]
    assert sniff_format(data) == fmt
    assert inspect_image(data) == ImageInfo(format=fmt, width=48, height=32, mime=f"image/{fmt}")


@pytest.mark.parametrize(
    "data",
    [b"", b"hello world", b"<html><body>not an image</body></html>", b"RIFF\x00\x00\x00\x00WAVE"],
)
def test_sniff_rejects_non_images(data: bytes) -> None:
    assert sniff_format(data) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"just text, saved as cat.png",
        random.Random(7).randbytes(2048),
        b"\x89PNG\r\n\x1a\n" + b"garbage" * 20,  # right magic, nothing behind it
        b"\xff\xd8\xff\xe0" + b"\x00" * 64,
        b"GIF89a" + b"\xff" * 3,
        b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8,
    ],
)
def test_inspect_refuses_garbage(data: bytes) -> None:
    with pytest.raises(MediaError) as info:
        inspect_image(data)
    assert not isinstance(info.value, TooLarge)


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_refuses_truncated(fmt: str) -> None:
    data = make_image(fmt, (96, 96))
    with pytest.raises(MediaError, match=r"not a valid|not a JPEG"):
        inspect_image(data[: len(data) // 2])


def test_inspect_refuses_decompression_bomb_headers() -> None:
    # Over our 50 Mpx default but under Pillow's own limit: our header check.
    with pytest.raises(TooLarge, match="pixels"):
        inspect_image(png_with_header(8000, 8000))
    # Beyond Pillow's hard limit: its DecompressionBombError, mapped to TooLarge.
    with pytest.raises(TooLarge):
        inspect_image(png_with_header(100_000, 100_000), max_side=200_000, max_pixels=10**12)
    with pytest.raises(TooLarge):
        inspect_image(gif_with_header(65535, 65535))
    # A single absurd side.
    with pytest.raises(TooLarge, match="each side"):
        inspect_image(png_with_header(20_000, 1))


def test_inspect_limits_are_parameters(images: dict[str, bytes]) -> None:
    with pytest.raises(TooLarge):
        inspect_image(images["png"], max_pixels=48 * 32 - 1)
    with pytest.raises(TooLarge):
        inspect_image(images["png"], max_side=40)
    assert inspect_image(images["png"], max_pixels=48 * 32, max_side=48).width == 48


def test_inspect_refuses_zero_size() -> None:
    with pytest.raises(MediaError):
        inspect_image(png_with_header(0, 10))
    with pytest.raises(MediaError):
        inspect_image(gif_with_header(0, 0))


def test_inspect_refuses_format_mismatch(images: dict[str, bytes]) -> None:
    # PNG magic followed by a JPEG body: sniffed as PNG, must decode as PNG.
    with pytest.raises(MediaError):
        inspect_image(b"\x89PNG\r\n\x1a\n" + images["jpeg"])


def test_inspect_limits_come_before_pillows_global_check() -> None:
    """Our header check runs before Image.open's process-wide bomb check: the
    refusal names the real size, Pillow warns nothing, and its global is untouched."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail here
        with pytest.raises(TooLarge, match="10000x10000"):  # between Pillow's warn and error
            inspect_image(png_with_header(10_000, 10_000), max_side=4096, max_pixels=4096**2)
        with pytest.raises(TooLarge, match="50000x50000"):  # past Pillow's error limit
            inspect_image(png_with_header(50_000, 50_000), max_side=4096, max_pixels=4096**2)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS


# --------------------------------------------------------------------------- data URIs


@pytest.mark.parametrize("fmt", FORMATS)
def test_data_uri_round_trip(images: dict[str, bytes], fmt: str) -> None:
    uri = to_data_uri(images[fmt], fmt)
    assert uri.startswith(f"data:image/{fmt};base64,")
    assert parse_data_uri(uri, max_bytes=1_000_000) == (images[fmt], f"image/{fmt}")


def test_data_uri_lenient_forms(images: dict[str, bytes]) -> None:
    b64 = base64.b64encode(images["jpeg"]).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert parse_data_uri(f"DATA:Image/JPG;base64,{wrapped}", max_bytes=10**6) == (
        images["jpeg"],
        "image/jpeg",
    )
    assert to_data_uri(b"x", "JPG").startswith("data:image/jpeg;base64,")
    # Not base64: percent-encoded octets (RFC 2397).
    assert parse_data_uri("data:image/png,%89PNG%0D%0A", max_bytes=100) == (
        b"\x89PNG\r\n",
        "image/png",
    )


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png;base64",  # no comma
        "image/png;base64,AAAA",  # no scheme
        "http://example.com/x.png",
        "data:text/plain;base64,aGVsbG8=",
        "data:;base64,aGVsbG8=",  # defaults to text/plain
        "data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=",
        "data:image/png;base64,@@@@not base64@@@@",
        "data:image/png;base64,A",  # impossible length
        "data:image/png;base64,",
    ],
)
def test_data_uri_malformed(uri: str) -> None:
    with pytest.raises(MediaError) as info:
        parse_data_uri(uri, max_bytes=1000)
    assert not isinstance(info.value, TooLarge)


def test_data_uri_too_large(images: dict[str, bytes]) -> None:
    uri = to_data_uri(images["png"], "png")
    with pytest.raises(TooLarge):
        parse_data_uri(uri, max_bytes=100)  # refused by the estimate, before decoding
    with pytest.raises(TooLarge):
        parse_data_uri(uri, max_bytes=len(images["png"]) - 1)  # exact check
    assert parse_data_uri(uri, max_bytes=len(images["png"]))[0] == images["png"]
    with pytest.raises(TooLarge):
        parse_data_uri("data:image/png," + "A" * 400, max_bytes=100)


def test_data_uri_strict_takes_only_canonical_base64(images: dict[str, bytes]) -> None:
    b64 = base64.b64encode(images["png"]).decode()
    assert parse_data_uri(f"data:image/png;base64,{b64}", max_bytes=10**6, strict=True) == (
        images["png"], "image/png")
    assert parse_data_uri(f"data:image/jpg;x=y;base64,{base64.b64encode(images['jpeg']).decode()}",
                          max_bytes=10**6, strict=True)[1] == "image/jpeg"
    lenient_only = [
        b64[:50] + "\n" + b64[50:],  # whitespace
        b64.rstrip("=") + ("A" if b64.endswith("=") else ""),  # padding off
        base64.urlsafe_b64encode(images["png"]).decode(),  # URL-safe alphabet
        b64.replace("+", "%2B").replace("/", "%2F"),  # percent-encoded
    ]
    assert b64 not in lenient_only
    for payload in lenient_only:
        parse_data_uri(f"data:image/png;base64,{payload}", max_bytes=10**6)  # lenient: fine
        with pytest.raises(MediaError, match="not valid base64"):
            parse_data_uri(f"data:image/png;base64,{payload}", max_bytes=10**6, strict=True)
    for payload in [b64 + "=", b64 + "====", "=" + b64[1:], b64[:-4] + "A=A=", b64 + " "]:
        with pytest.raises(MediaError, match="not valid base64"):
            parse_data_uri(f"data:image/png;base64,{payload}", max_bytes=10**6, strict=True)
    with pytest.raises(MediaError, match="base64-encoded"):
        parse_data_uri("data:image/png,%89PNG%0D%0A", max_bytes=100, strict=True)
    with pytest.raises(TooLarge):
        parse_data_uri(f"data:image/png;base64,{b64}", max_bytes=100, strict=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_data_uri_ok(images: dict[str, bytes], fmt: str) -> None:
    data, info = inspect_data_uri(to_data_uri(images[fmt], fmt), max_bytes=10**6)
    assert data == images[fmt] and info == ImageInfo(fmt, 48, 32, f"image/{fmt}")


@pytest.mark.parametrize(
    ("make_uri", "match", "too_large"),
    [
        (lambda im: to_data_uri(im["jpeg"], "png"), "declares image/png but its bytes are a JPEG",
         False),
        (lambda im: to_data_uri(im["gif"], "webp"), "declares image/webp but its bytes are a GIF",
         False),
        (lambda im: to_data_uri(b"plain text", "png"), "not a JPEG/PNG/GIF/WebP", False),
        (lambda im: to_data_uri(im["jpeg"][:300], "jpeg"), "corrupt or truncated", False),
        (lambda im: "data:image/svg+xml;base64,PHN2Zy8+", "not 'image/svg\\+xml'", False),
        (lambda im: "data:image/png;base64,iVBO R", "not valid base64", False),
        (lambda im: to_data_uri(png_with_header(5000, 5000), "png"), "5000x5000", True),
    ],
    ids=["png-label-jpeg", "webp-label-gif", "text", "truncated", "svg", "bad-b64", "bomb"],
)
def test_inspect_data_uri_refusals(
    images: dict[str, bytes], make_uri: Callable[[dict[str, bytes]], str], match: str,
    too_large: bool,
) -> None:
    with pytest.raises(MediaError, match=match) as info:
        inspect_data_uri(make_uri(images), max_bytes=10**6, max_pixels=4096**2, max_side=4096)
    assert isinstance(info.value, TooLarge) is too_large


@pytest.mark.parametrize("fmt", FORMATS)
def test_b64_to_data_uri_uses_sniffed_format(images: dict[str, bytes], fmt: str) -> None:
    bare = base64.b64encode(images[fmt]).decode()
    uri = b64_to_data_uri(bare, expected="jpeg")  # upstream may lie / default to jpeg
    assert uri == to_data_uri(images[fmt], fmt)


def test_b64_to_data_uri_lenient_inputs(images: dict[str, bytes]) -> None:
    png = images["png"]
    expected = to_data_uri(png, "png")
    b64 = base64.b64encode(png).decode()
    assert b64_to_data_uri(b64.rstrip("=") + "\n") == expected  # missing padding
    assert b64_to_data_uri(base64.urlsafe_b64encode(png).decode()) == expected
    assert b64_to_data_uri(f"data:image/jpeg;base64,{b64}") == expected  # relabelled


@pytest.mark.parametrize(
    "value",
    ["", "   ", base64.b64encode(b"plain text, not an image").decode(), "!!!notbase64!!!"],
)
def test_b64_to_data_uri_refuses_non_images(value: str) -> None:
    with pytest.raises(MediaError):
        b64_to_data_uri(value)


# --------------------------------------------------------------------------- host patterns


@pytest.mark.parametrize(
    ("host", "patterns", "expected"),
    [
        ("example.com", ["example.com"], True),
        ("EXAMPLE.com", ["example.COM"], True),
        ("example.com.", ["example.com"], True),
        ("example.com:8443", ["example.com"], True),
        ("example.com:8443", ["example.com:8443"], True),
        ("example.com:443", ["example.com:8443"], False),
        ("example.com", ["example.com:8443"], False),
        ("a.example.com", ["*.example.com"], True),
        ("a.b.example.com:443", ["*.example.com"], True),
        ("example.com", ["*.example.com"], False),  # wildcard is subdomains only
        ("evil-example.com", ["*.example.com"], False),
        ("evilexample.com", ["example.com", "*.example.com"], False),
        ("example.com.evil.net", ["example.com", "*.example.com"], False),
        ("a.example.com", ["example.com"], False),
        ("bücher.example", ["xn--bcher-kva.example"], True),  # IDN vs punycode
        ("xn--bcher-kva.example", ["BÜCHER.example"], True),
        ("a.bücher.example", ["*.bücher.example"], True),
        ("127.0.0.1", ["127.0.0.1"], True),
        ("[::1]:8080", ["0:0:0:0:0:0:0:1"], True),
        ("::1", ["[::1]:8080"], False),
        ("1.2.3.4", ["*.3.4"], False),  # IP literals never match wildcards
        ("example.com", [], False),
        ("example.com", ["", "[bad", "example.com:99999", "example.com"], True),
        ("", ["*.example.com"], False),
        ("*.example.com", ["*.example.com"], False),
    ],
)
def test_host_matches(host: str, patterns: list[str], expected: bool) -> None:
    assert host_matches(host, patterns) is expected


# --------------------------------------------------------------------------- guard


def stub_resolver(table: Mapping[str, Sequence[str]]) -> Callable[[str, int], Awaitable[list[str]]]:
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"stub resolver: unknown host {host}")
        return list(table[host])

    return resolve


PRIVATE_URLS = [
    "http://127.0.0.1/x.png",
    "http://127.8.9.10:8080/",
    "http://[::1]/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/",
    "http://[fe80::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
    "http://[2002:a00:1::]/",  # 6to4 of 10.0.0.1
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://localhost/",  # real resolver: /etc/hosts
    "http://LOCALHOST:8000/",
    "http://127.1/",  # numeric shorthand, parsed by getaddrinfo, no DNS
    "http://2130706433/",
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
async def test_guard_refuses_private_addresses(url: str) -> None:
    with pytest.raises(BlockedURL):
        await OutboundGuard().check_url(url)


@pytest.mark.parametrize("url", PRIVATE_URLS)
async def test_guard_allow_private_permits_them(url: str) -> None:
    await OutboundGuard(allow_private=True).check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34/image.png",
        "https://93.184.216.34:8443/a?b=c",
        "https://[2606:2800:220:1:248:1893:25c8:1946]/",
        "http://8.8.8.8/",
    ],
)
async def test_guard_allows_public_literals(url: str) -> None:
    await OutboundGuard().check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://93.184.216.34/x.png",
        "file:///etc/passwd",
        "gopher://93.184.216.34/",
        "data:image/png;base64,AAAA",
        "javascript:alert(1)",
        "//93.184.216.34/x.png",
        "http://user:pw@93.184.216.34/",
        "http://user@93.184.216.34/",
        "https://:secret@93.184.216.34/",
        "http:///nohost",
        "not a url at all",
    ],
)
@pytest.mark.parametrize("allow_private", [False, True])
async def test_guard_refuses_schemes_and_userinfo(url: str, allow_private: bool) -> None:
    with pytest.raises(BlockedURL):
        await OutboundGuard(allow_private=allow_private).check_url(url)


async def test_guard_any_private_answer_refuses() -> None:
    guard = OutboundGuard(
        resolver=stub_resolver(
            {"mixed.example": ["93.184.216.34", "10.0.0.7"], "public.example": ["93.184.216.34"]}
        )
    )
    with pytest.raises(BlockedURL) as info:
        await guard.check_url("https://mixed.example/cat.png")
    assert "private" in info.value.reason
    assert "10.0.0.7" not in info.value.reason  # internal address stays out of client text
    assert info.value.detail is not None and "10.0.0.7" in info.value.detail
    await guard.check_url("https://public.example/cat.png")


async def test_guard_metadata_names_and_host_lists() -> None:
    guard = OutboundGuard(resolver=stub_resolver({}))
    with pytest.raises(BlockedURL, match="metadata"):
        await guard.check_url("http://metadata.google.internal/computeMetadata/v1/")
    with pytest.raises(BlockedURL, match="metadata"):
        await guard.check_url("http://Metadata.Google.Internal./")

    lists = OutboundGuard(
        allowed_hosts=("*.cdn.example", "93.184.216.34"),
        blocked_hosts=("bad.cdn.example",),
        resolver=stub_resolver({"img.cdn.example": ["93.184.216.34"]}),
    )
    await lists.check_url("https://img.cdn.example/a.png")
    await lists.check_url("http://93.184.216.34/a.png")
    with pytest.raises(BlockedURL, match="blocked"):
        await lists.check_url("https://bad.cdn.example/a.png")
    with pytest.raises(BlockedURL, match="allowed"):
        await lists.check_url("http://8.8.8.8/a.png")


async def test_guard_resolution_failures_are_media_errors() -> None:
    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return []

    with pytest.raises(MediaError, match="could not resolve") as info:
        await OutboundGuard(resolver=stub_resolver({})).check_url("http://nowhere.example/")
    assert not isinstance(info.value, BlockedURL)
    with pytest.raises(MediaError, match="timed out"):
        await OutboundGuard(resolver=slow, resolve_timeout_s=0.05).check_url("http://x.example/")
    with pytest.raises(MediaError, match="could not resolve"):
        await OutboundGuard(resolver=stub_resolver({"e.example": []})).check_url(
            "http://e.example/"
        )

    async def idna_fails(host: str, port: int) -> list[str]:
        # What socket.getaddrinfo raises, before any DNS, for a label over 63 characters.
        raise UnicodeError("encoding with 'idna' codec failed (label empty or too long)")

    with pytest.raises(MediaError, match="not a valid name") as info:
        await OutboundGuard(resolver=idna_fails).check_url(f"http://{'a' * 70}.example/")
    assert not isinstance(info.value, BlockedURL)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0.0.0.0", "0.0.0.0"),
        ("10.1", "10.0.0.1"),
        ("1.16777215", "1.255.255.255"),
        ("0xffffffff", "255.255.255.255"),
        ("::1", "::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("fe80::1%25eth0", "fe80::1%25eth0"),
        ("example.com", None),
        ("1.2.3.4.5", None),
        ("256.1", None),
        ("1.16777216", None),
        ("4294967296", None),
        ("08.1", None),  # not octal: a resolver asks DNS, and so the guard resolves it
        ("0x", None),
        ("", None),
        ("a.b", None),
    ],
)
def test_parse_ip_literal(host: str, expected: str | None) -> None:
    got = parse_ip_literal(host)
    assert (None if got is None else str(got)) == expected


LEGACY_LOOPBACK = ["127.1", "0x7f.1", "0x7f000001", "2130706433", "017700000001", "127.0.0.1.",
                   "0", "10.1"]


@pytest.mark.parametrize("host", LEGACY_LOOPBACK)
async def test_guard_reads_every_ipv4_spelling_as_a_literal(host: str) -> None:
    # A resolver that would call them public is never asked: they are addresses.
    asked: list[str] = []

    async def lying(name: str, port: int) -> list[str]:
        asked.append(name)
        return ["93.184.216.34"]

    with pytest.raises(BlockedURL, match=r"is an? (loopback|unspecified|private) address"):
        await OutboundGuard(resolver=lying).check_url(f"http://{host}/x.png")
    with pytest.raises(BlockedURL):
        OutboundGuard(resolver=lying).check_without_dns(f"http://{host}/x.png")
    assert asked == []
    target = await OutboundGuard(allow_private=True, resolver=lying).resolve(f"http://{host}/")
    assert target.host_is_ip and asked == []


async def test_check_without_dns_asks_no_resolver() -> None:
    asked: list[str] = []

    async def resolver(name: str, port: int) -> list[str]:
        asked.append(name)
        return ["127.0.0.1"]

    guard = OutboundGuard(resolver=resolver)
    assert guard.check_without_dns("https://rebind.example/x.png").host == "rebind.example"
    for url in ["http://[::ffff:10.0.0.1]/", "http://u:p@93.184.216.34/", "ftp://x.example/",
                "http://metadata.google.internal/"]:
        with pytest.raises(BlockedURL):
            guard.check_without_dns(url)
    assert asked == []
    with pytest.raises(BlockedURL, match="resolves to a loopback"):  # resolve() still resolves
        await guard.resolve("https://rebind.example/x.png")


@pytest.mark.parametrize("address", ["fec0::1", "fc00::1", "fe80::1", "::127.0.0.1", "0.1.2.3",
                                     "198.18.0.1", "::ffff:8.8.8.8"])
def test_address_refusal_more_classes(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is not None


# --------------------------------------------------------------------------- local server

Route = Callable[[asyncio.StreamWriter, dict[str, str]], Awaitable[None]]


async def respond(
    writer: asyncio.StreamWriter,
    status: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    content_length: bool = True,
) -> None:
    lines = [f"HTTP/1.1 {status}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


class LocalServer:
    """Raw HTTP/1.1 on 127.0.0.1, one request per connection, routes by path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with asyncio.timeout(2):
                head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").strip().split("\r\n")
            _method, path, _version = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            self.requests.append((path, headers))
            route = self.routes.get(path)
            if route is None:
                await respond(writer, "404 Not Found", b"nope")
            else:
                await route(writer, headers)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


@pytest.fixture
async def server(images: dict[str, bytes]) -> AsyncIterator[LocalServer]:
    srv = LocalServer()
    png = images["png"]

    async def png_route(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
        await respond(writer, "200 OK", png, {"Content-Type": "image/png"})

    async def text_as_png(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
        await respond(writer, "200 OK", b"I am text, named .png", {"Content-Type": "image/png"})

    async def huge_declared(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        await asyncio.sleep(2)  # never sends the rest

    async def huge_streamed(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
        # No Content-Length: body delimited by connection close.
        await respond(writer, "200 OK", content_length=False)
        for _ in range(64):  # 2 MiB at most
            writer.write(b"\x00" * 32768)
            await writer.drain()

    async def trickle(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(200):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)

    def redirect_to(location: str) -> Route:
        async def route(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
            await respond(writer, "302 Found", headers={"Location": location})

        return route

    async def echo_host(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
        await respond(writer, "200 OK", headers.get("host", "").encode())

    async def no_location(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
        await respond(writer, "301 Moved Permanently")

    async def server_error(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
        await respond(writer, "503 Service Unavailable", b"busy")

    await srv.start()
    srv.routes.update(
        {
            "/cat.png": png_route,
            "/text.png": text_as_png,
            "/huge-declared": huge_declared,
            "/huge-streamed": huge_streamed,
            "/trickle": trickle,
            "/echo-host": echo_host,
            "/no-location": no_location,
            "/503": server_error,
            "/to-cat": redirect_to("/cat.png"),
            "/to-absolute-cat": redirect_to(f"{srv.base}/cat.png"),
            "/to-localhost": redirect_to(f"http://localhost:{srv.port}/cat.png"),
            "/to-metadata": redirect_to("http://169.254.169.254/latest/meta-data/"),
            "/to-mapped": redirect_to(f"http://[::ffff:127.0.0.1]:{srv.port}/cat.png"),
            "/to-file": redirect_to("file:///etc/passwd"),
            "/loop": redirect_to("/loop"),
            "/hop1": redirect_to("/hop2"),
            "/hop2": redirect_to("/cat.png"),
        }
    )
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as c:
        yield c


LOCAL = OutboundGuard(allow_private=True)


class LiteralLoopbackGuard(OutboundGuard):
    """Strict guard that exempts the literal 127.0.0.1 (where the test server lives)."""

    async def resolve(self, url: str | httpx.URL) -> Target:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        if parsed.host == "127.0.0.1":
            return await OutboundGuard(allow_private=True).resolve(parsed)
        return await super().resolve(parsed)


async def test_download_ok(server: LocalServer, client: httpx.AsyncClient) -> None:
    body, ctype = await download(
        client, f"{server.base}/cat.png", max_bytes=100_000, timeout_s=2, guard=LOCAL
    )
    assert sniff_format(body) == "png"
    assert ctype == "image/png"
    assert server.requests[0][1]["accept-encoding"] == "identity"


async def test_download_default_guard_refuses_loopback(
    server: LocalServer, client: httpx.AsyncClient
) -> None:
    with pytest.raises(BlockedURL):
        await download(client, f"{server.base}/cat.png", max_bytes=100_000, timeout_s=2)
    assert server.requests == []  # refused before any connection


async def test_download_too_large_by_content_length(
    server: LocalServer, client: httpx.AsyncClient
) -> None:
    started = time.monotonic()
    with pytest.raises(TooLarge):
        await download(
            client, f"{server.base}/huge-declared", max_bytes=50_000, timeout_s=3, guard=LOCAL
        )
    assert time.monotonic() - started < 1  # did not wait for the body


async def test_download_too_large_while_streaming(
    server: LocalServer, client: httpx.AsyncClient
) -> None:
    with pytest.raises(TooLarge):
        await download(
            client, f"{server.base}/huge-streamed", max_bytes=50_000, timeout_s=3, guard=LOCAL
        )


async def test_download_to_streams_chunks_and_stops_at_the_cap(
    server: LocalServer, client: httpx.AsyncClient
) -> None:
    """Streamed to a sink: the body arrives in pieces, never whole in one buffer, and
    a body past max_bytes stops the download having handed on at most max_bytes."""
    chunks: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        chunks.append(chunk)

    whole, _ = await download(client, f"{server.base}/cat.png", max_bytes=100_000,
                              timeout_s=2, guard=LOCAL)
    ctype = await download_to(client, f"{server.base}/to-cat", sink, max_bytes=100_000,
                              timeout_s=2, guard=LOCAL)
    assert ctype == "image/png" and b"".join(chunks) == whole
    chunks.clear()
    with pytest.raises(TooLarge):
        await download_to(client, f"{server.base}/huge-streamed", sink, max_bytes=200_000,
                          timeout_s=3, guard=LOCAL)
    assert len(chunks) > 1 and sum(map(len, chunks)) <= 200_000
    with pytest.raises(BlockedURL):  # the strict default guard: refused before connecting
        await download_to(client, f"{server.base}/cat.png", sink, max_bytes=10, timeout_s=2)
    with pytest.raises(BlockedURL, match="allowed"):  # every hop checked
        await download_to(client, f"{server.base}/to-localhost", sink, max_bytes=10**6,
                          timeout_s=2, guard=LOCAL, allowed_hosts=["127.0.0.1"])


async def test_download_timeout_on_trickle(server: LocalServer, client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    with pytest.raises(MediaError, match="did not finish") as info:
        await download(
            client, f"{server.base}/trickle", max_bytes=50_000, timeout_s=0.3, guard=LOCAL
        )
    assert not isinstance(info.value, TooLarge)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("path", ["/to-cat", "/to-absolute-cat", "/hop1"])
async def test_download_follows_redirects(
    server: LocalServer, client: httpx.AsyncClient, path: str
) -> None:
    body, _ = await download(
        client, f"{server.base}{path}", max_bytes=100_000, timeout_s=2, guard=LOCAL
    )
    assert sniff_format(body) == "png"


async def test_download_redirect_limits(server: LocalServer, client: httpx.AsyncClient) -> None:
    with pytest.raises(MediaError, match="more than 3"):
        await download(client, f"{server.base}/loop", max_bytes=1000, timeout_s=2, guard=LOCAL)
    assert len(server.requests) == 4  # first request + 3 redirects, then stop
    with pytest.raises(MediaError, match="more than 1"):
        await download(
            client,
            f"{server.base}/hop1",
            max_bytes=10**6,
            timeout_s=2,
            guard=LOCAL,
            max_redirects=1,
        )
    with pytest.raises(MediaError, match="without a Location"):
        await download(client, f"{server.base}/no-location", max_bytes=10, timeout_s=2, guard=LOCAL)


async def test_download_redirect_to_disallowed_host(
    server: LocalServer, client: httpx.AsyncClient
) -> None:
    # allowed_hosts is checked on every hop: localhost is not 127.0.0.1.
    with pytest.raises(BlockedURL, match="allowed"):
        await download(
            client,
            f"{server.base}/to-localhost",
            max_bytes=100_000,
            timeout_s=2,
            guard=LOCAL,
            allowed_hosts=["127.0.0.1"],
        )
    assert [path for path, _ in server.requests] == ["/to-localhost"]


@pytest.mark.parametrize("path", ["/to-metadata", "/to-mapped", "/to-localhost", "/to-file"])
async def test_download_redirect_refused_by_guard(
    server: LocalServer, client: httpx.AsyncClient, path: str
) -> None:
    guard = LiteralLoopbackGuard()
    body, _ = await download(
        client, f"{server.base}/cat.png", max_bytes=100_000, timeout_s=2, guard=guard
    )
    assert body  # the exemption works for the first hop...
    with pytest.raises(BlockedURL):  # ...but every later hop is checked strictly
        await download(client, f"{server.base}{path}", max_bytes=100_000, timeout_s=2, guard=guard)
    assert [p for p, _ in server.requests] == ["/cat.png", path]


async def test_download_allowed_hosts_first_hop(
    server: LocalServer, client: httpx.AsyncClient
) -> None:
    url = f"{server.base}/cat.png"
    with pytest.raises(BlockedURL):
        await download(
            client, url, max_bytes=10**6, timeout_s=2, guard=LOCAL, allowed_hosts=["*.example.com"]
        )
    with pytest.raises(BlockedURL):  # guard-level list too
        await download(
            client,
            url,
            max_bytes=10**6,
            timeout_s=2,
            guard=OutboundGuard(allow_private=True, allowed_hosts=("images.example.com",)),
        )
    assert server.requests == []
    body, _ = await download(
        client,
        url,
        max_bytes=10**6,
        timeout_s=2,
        guard=LOCAL,
        allowed_hosts=[f"127.0.0.1:{server.port}"],
    )
    assert body


async def test_download_http_errors(server: LocalServer, client: httpx.AsyncClient) -> None:
    with pytest.raises(MediaError, match="HTTP 404"):
        await download(client, f"{server.base}/missing", max_bytes=10**6, timeout_s=2, guard=LOCAL)
    with pytest.raises(MediaError, match="HTTP 503"):
        await download(client, f"{server.base}/503", max_bytes=10**6, timeout_s=2, guard=LOCAL)


class IPOnlyTransport(httpx.AsyncHTTPTransport):
    """Fails the test if httpx is ever asked to resolve a name itself."""

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        ipaddress.ip_address(request.url.host)  # raises for a hostname
        self.hosts.append(request.url.host)
        return await super().handle_async_request(request)


async def test_download_connects_to_checked_address(server: LocalServer) -> None:
    """DNS rebinding: the connection goes to the address the guard approved."""
    answers = {"images.invalid": ["127.0.0.1"]}
    guard = OutboundGuard(allow_private=True, resolver=stub_resolver(answers))
    transport = IPOnlyTransport()
    async with httpx.AsyncClient(transport=transport, trust_env=False) as ip_client:
        body, _ = await download(
            ip_client,
            f"http://images.invalid:{server.port}/echo-host",
            max_bytes=1000,
            timeout_s=2,
            guard=guard,
        )
    assert body == f"images.invalid:{server.port}".encode()  # virtual host preserved
    assert transport.hosts == ["127.0.0.1"]


async def test_download_tries_next_checked_address(server: LocalServer) -> None:
    # Nothing listens on [::1]:port, so that connect fails and 127.0.0.1 is tried.
    guard = OutboundGuard(
        allow_private=True, resolver=stub_resolver({"images.invalid": ["::1", "127.0.0.1"]})
    )
    transport = IPOnlyTransport()
    async with httpx.AsyncClient(transport=transport, trust_env=False) as ip_client:
        body, _ = await download(
            ip_client,
            f"http://images.invalid:{server.port}/cat.png",
            max_bytes=10**6,
            timeout_s=2,
            guard=guard,
        )
    assert sniff_format(body) == "png"
    assert transport.hosts == ["::1", "127.0.0.1"]


async def test_download_connects_to_the_canonical_literal(server: LocalServer) -> None:
    """``127.1`` was checked as 127.0.0.1; that is the address the client is given."""
    transport = IPOnlyTransport()  # would fail on "127.1", which is not an IP for ipaddress
    async with httpx.AsyncClient(transport=transport, trust_env=False) as ip_client:
        body, _ = await download(ip_client, f"http://127.1:{server.port}/cat.png",
                                 max_bytes=10**6, timeout_s=2, guard=LOCAL)
    assert sniff_format(body) == "png"
    assert transport.hosts == ["127.0.0.1"]


async def test_download_connect_refused(client: httpx.AsyncClient) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(MediaError, match="could not connect"):
        await download(client, f"http://127.0.0.1:{port}/", max_bytes=10, timeout_s=2, guard=LOCAL)


# --------------------------------------------------------------------------- fetch_image


async def test_fetch_image_url_and_data_uri(
    server: LocalServer, client: httpx.AsyncClient, images: dict[str, bytes]
) -> None:
    data, info = await fetch_image(
        client, f"{server.base}/cat.png", field="image", max_bytes=10**6, timeout_s=2, guard=LOCAL
    )
    assert (data, info.format, info.width) == (images["png"], "png", 48)
    uri = to_data_uri(images["webp"], "webp")
    data, info = await fetch_image(
        client, uri, field="mask_image", max_bytes=10**6, timeout_s=2, guard=LOCAL
    )
    assert info == ImageInfo("webp", 48, 32, "image/webp")


async def test_fetch_image_errors_carry_field(
    server: LocalServer, client: httpx.AsyncClient, images: dict[str, bytes]
) -> None:
    local = functools.partial(fetch_image, client, max_bytes=10**6, timeout_s=2.0, guard=LOCAL)
    with pytest.raises(MediaError, match="not a JPEG/PNG/GIF/WebP") as info:
        await local(f"{server.base}/text.png", field="image")
    assert info.value.field == "image"
    assert str(info.value).startswith("image: ")

    garbage = "data:image/png;base64," + base64.b64encode(b"not really a png").decode()
    with pytest.raises(MediaError) as info:
        await local(garbage, field="mask_image")
    assert info.value.field == "mask_image"

    with pytest.raises(TooLarge) as too_large:
        await fetch_image(
            client, to_data_uri(images["png"], "png"), field="image", max_bytes=100, timeout_s=2
        )
    assert too_large.value.field == "image"

    with pytest.raises(BlockedURL) as blocked:  # guard=None is the strict default
        await fetch_image(
            client, f"{server.base}/cat.png", field="image", max_bytes=10**6, timeout_s=2
        )
    assert blocked.value.field == "image"

    with pytest.raises(MediaError) as empty:
        await local("  ", field="image")
    assert empty.value.field == "image"
