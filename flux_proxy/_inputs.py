"""Request images in, image bytes out: local files and bytes become data URIs (the
type sniffed from the bytes, since the proxy refuses a declared type the bytes are
not), URLs and data URIs pass as they are; outputs get their extension the same way."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any, overload

from flux_proxy._errors import ImageInputError

ImageInput = str | bytes | os.PathLike[str]

# What the proxy accepts inline (README "Request images"); the limit is its decoded cap.
MAX_IMAGE_BYTES = 12 * 1024 * 1024
_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}


def sniff(data: bytes) -> str | None:
    """The image MIME type of these bytes by their signature, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def data_uri(data: bytes, what: str = "image") -> str:
    mime = sniff(data)
    if mime is None:
        raise ImageInputError(f"{what} is not a JPEG, PNG, GIF or WebP image")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageInputError(f"{what} is {len(data)} bytes; the proxy takes at most "
                              f"{MAX_IMAGE_BYTES}")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@overload
def encode_image(value: None, what: str = ...) -> None: ...
@overload
def encode_image(value: ImageInput, what: str = ...) -> str: ...
def encode_image(value: ImageInput | None, what: str = "image") -> str | None:
    """`value` as the proxy's `image` / `mask_image` field: a URL or data URI as is,
    bytes or a local file (a path) as a data URI. ImageInputError when it is not one."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return data_uri(bytes(value), what)
    if isinstance(value, str) and value[:8].lower().startswith(("http://", "https://")):
        return value
    if isinstance(value, str) and value[:5].lower() == "data:":
        return value
    path = Path(value)
    if not path.is_file():
        raise ImageInputError(f"{what} {str(value)[:200]!r} is not a file, an http(s) URL "
                              "or a data URI")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ImageInputError(f"{what} {path} is larger than {MAX_IMAGE_BYTES} bytes")
    return data_uri(path.read_bytes(), f"{what} {path}")


def decode_data_uri(uri: str) -> tuple[str | None, bytes]:
    """(MIME type, bytes) of a base64 data URI."""
    head, _, payload = uri.partition(",")
    mime = head[5:].split(";")[0].strip().lower() or None
    try:
        return mime, base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"output is not a valid base64 data URI: {exc}") from exc


def extension(content_type: str | None, data: bytes) -> str:
    """File extension for an output: from its bytes, else its declared type, else bin."""
    mime = sniff(data) or (content_type or "").split(";")[0].strip().lower()
    return _EXT.get(mime, "bin")


def request_body(prompt: str, *, size: str | None, num_images: int | None,
                 seed: int | None, image: ImageInput | None, mask: ImageInput | None,
                 providers: list[str] | None, extra: dict[str, Any]) -> dict[str, Any]:
    """The POST /v1/predictions body: only what was given (the proxy has the defaults)."""
    body: dict[str, Any] = {"prompt": prompt}
    for name, value in (("size", size), ("num_images", num_images), ("seed", seed),
                        ("image", encode_image(image, "image")),
                        ("mask_image", encode_image(mask, "mask")),
                        ("providers", providers)):
        if value is not None:
            body[name] = value
    body.update(extra)
    return body
