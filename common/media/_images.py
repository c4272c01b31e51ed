"""Recognise, validate and encode the four accepted image formats.

Magic bytes are only a cheap first look (``sniff_format``); anything we accept
is fully decoded by Pillow (``inspect_image``).
"""

from __future__ import annotations

import binascii
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import MediaError, TooLarge

if TYPE_CHECKING:
    from PIL import ImageFile

# Pillow is imported on first use (the first request that carries an image), not at
# start-up: a serving process that never sees one does not hold it in memory.

MIME_TYPES: dict[str, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
}
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}
_LABELS = {"jpeg": "JPEG", "png": "PNG", "webp": "WebP", "gif": "GIF"}
FORMAT_LABELS = _LABELS  # "jpeg" -> "JPEG", for messages


def _header_reader(fmt: str) -> type[ImageFile.ImageFile]:
    """The format's own image class: opening it directly reads the header (size)
    without Image.open's process-wide decompression-bomb check."""
    from PIL import GifImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

    readers: dict[str, type[ImageFile.ImageFile]] = {
        "jpeg": JpegImagePlugin.JpegImageFile,
        "png": PngImagePlugin.PngImageFile,
        "webp": WebPImagePlugin.WebPImageFile,
        "gif": GifImagePlugin.GifImageFile,
    }
    return readers[fmt]


_ALIASES = {"jpg": "jpeg", "pjpeg": "jpeg", "x-png": "png"}
NOT_AN_IMAGE = "not a JPEG/PNG/GIF/WebP image"


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "jpeg" | "png" | "webp" | "gif"
    width: int
    height: int
    mime: str


def normalize_format(fmt: str) -> str | None:
    """``"JPG"`` -> ``"jpeg"``; ``None`` for anything that is not one of ours."""
    name = fmt.strip().lower()
    name = _ALIASES.get(name, name)
    return name if name in MIME_TYPES else None


def format_for_mime(mime: str) -> str | None:
    """``"image/JPEG; q=1"`` -> ``"jpeg"``; ``None`` for non-image or unsupported types."""
    main = mime.split(";", 1)[0].strip().lower()
    kind, _, sub = main.partition("/")
    if kind != "image":
        return None
    return normalize_format(sub)


def sniff_format(data: bytes) -> str | None:
    """The format named by the leading magic bytes, or ``None``. No decoding."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _check_dimensions(width: int, height: int, *, max_pixels: int, max_side: int) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"image has an empty size ({width}x{height})")
    if width > max_side or height > max_side:
        raise TooLarge(f"image is {width}x{height} pixels; each side must be at most {max_side}")
    if width * height > max_pixels:
        raise TooLarge(
            f"image is {width}x{height} pixels; at most {max_pixels} pixels are accepted"
        )


# Peak memory of a full decode (inspect_image's im.load()), bytes per pixel, measured with
# Pillow 11/12 on 4096x4096 images (VmHWM growth): PNG 4 (RGBA; 1 for L), GIF 1, JPEG 4
# baseline but 10 progressive RGB and 12 progressive CMYK (libjpeg keeps every
# coefficient), WebP 17 (libwebp's canvases plus Pillow's copy). Rounded up, plus a
# fixed allowance for decoder state.
DECODE_BYTES_PER_PIXEL = {"png": 5, "gif": 4, "jpeg": 13, "webp": 18}
DECODE_FIXED_BYTES = 1024 * 1024


def decode_cost(fmt: str, width: int, height: int) -> int:
    """Bytes a full decode of a ``fmt`` image of this size may need at its peak."""
    rate = DECODE_BYTES_PER_PIXEL.get(fmt, max(DECODE_BYTES_PER_PIXEL.values()))
    return width * height * rate + DECODE_FIXED_BYTES


def read_header(data: bytes, *, max_pixels: int = 50_000_000,
                max_side: int = 8192) -> tuple[str, int, int]:
    """``(format, width, height)`` from the header alone, limits checked: no pixels
    decoded, so it costs what the header costs. :class:`MediaError` for anything
    that is not one of the four formats or whose header is unreadable."""
    fmt = sniff_format(data)
    if fmt is None:
        raise MediaError(NOT_AN_IMAGE)
    try:
        # The format's own class: no pixels, and not yet Pillow's process-wide
        # MAX_IMAGE_PIXELS check (which Image.open runs), so our limits decide and
        # the 422 can say the real dimensions.
        with _header_reader(fmt)(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception as exc:  # any parser failure on untrusted input is a refusal
        raise MediaError(
            f"not a valid {_LABELS[fmt]} image (corrupt or truncated)",
            detail=f"{type(exc).__name__}: {exc}",
        ) from exc
    _check_dimensions(width, height, max_pixels=max_pixels, max_side=max_side)
    return fmt, width, height


def inspect_image(data: bytes, *, max_pixels: int = 50_000_000, max_side: int = 8192) -> ImageInfo:
    """Fully validate ``data`` as a JPEG/PNG/GIF/WebP image and describe it.

    The dimensions from the header are checked *before* any pixel data is
    decoded (and before Pillow's own check), so a decompression bomb costs only
    its header. Pillow's ``Image.MAX_IMAGE_PIXELS`` guard (global, left untouched
    here) still applies on top, for limits above it, and is reported as
    :class:`TooLarge`. For animated GIF/WebP only the first frame is decoded.

    CPU-bound: call it through ``asyncio.to_thread`` from async code for large
    inputs (``fetch_image`` does).
    """
    from PIL import Image

    # Pass 0: the header alone (read_header), our limits before Pillow's.
    fmt, width, height = read_header(data, max_pixels=max_pixels, max_side=max_side)
    pil_formats = [_PIL_FORMATS[fmt]]
    label = _LABELS[fmt]
    try:
        # Pass 1: header + structural check (PNG verifies every chunk CRC).
        with Image.open(io.BytesIO(data), formats=pil_formats) as im:
            im.verify()
        # Pass 2: verify() leaves the image unusable; reopen and decode pixels.
        with Image.open(io.BytesIO(data), formats=pil_formats) as im:
            if im.size != (width, height):  # pragma: no cover - defensive
                raise MediaError(f"not a valid {label} image")
            im.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise TooLarge("image dimensions exceed the decompression-bomb limit") from exc
    except Exception as exc:  # any decoder failure on untrusted input is a refusal
        raise MediaError(
            f"not a valid {label} image (corrupt or truncated)",
            detail=f"{type(exc).__name__}: {exc}",
        ) from exc
    return ImageInfo(format=fmt, width=width, height=height, mime=MIME_TYPES[fmt])


_B64_STEP = 3 * 256 * 1024  # raw bytes per encoding step (a multiple of 3): 1 MiB of text


def _data_uri_prefix(fmt: str) -> bytes:
    name = normalize_format(fmt)
    if name is None:
        raise MediaError(f"unsupported image format {fmt!r}")
    return f"data:{MIME_TYPES[name]};base64,".encode("ascii")


def data_uri_length(size: int, fmt: str) -> int:
    """Characters in the data URI of ``size`` bytes of a ``fmt`` image."""
    return len(_data_uri_prefix(fmt)) + 4 * ((size + 2) // 3)


def data_uri_bytes(data: bytes, fmt: str) -> bytearray:
    """The data URI of ``data`` as ASCII bytes, written into one buffer of its exact size.

    Memory: the buffer (4/3 of ``data``) and 1 MiB of scratch, nothing more. Drop
    ``data`` before ``.decode("ascii")`` and the peak of making the final string
    is two copies of the text, not the four transient copies of the naive
    ``f"...{b64encode(data).decode()}"`` (text as bytes, as str, and the f-string,
    beside ``data``).
    """
    prefix = _data_uri_prefix(fmt)
    out = bytearray(data_uri_length(len(data), fmt))
    out[: len(prefix)] = prefix
    pos = len(prefix)
    with memoryview(data) as view:
        for start in range(0, len(view), _B64_STEP):
            piece = binascii.b2a_base64(view[start:start + _B64_STEP], newline=False)
            out[pos:pos + len(piece)] = piece
            pos += len(piece)
            del piece
    return out


def to_data_uri(data: bytes, fmt: str) -> str:
    """``data:image/<fmt>;base64,...``; ``fmt`` is one of jpeg/png/webp/gif (``jpg`` ok)."""
    return data_uri_bytes(data, fmt).decode("ascii")
