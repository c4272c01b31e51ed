"""Encode generated images to the bytes of the requested output format."""

from __future__ import annotations

import io
from typing import Literal

from PIL import Image

OutputFormat = Literal["jpeg", "png", "webp"]

JPEG_QUALITY = 95
WEBP_QUALITY = 95


def encode(image: Image.Image, fmt: OutputFormat) -> bytes:
    """``image`` as JPEG (quality 95), PNG or WebP (lossy, quality 95) bytes.

    Deterministic: the same pixels give the same bytes (no timestamps or
    other metadata are written), so a fixed seed reproduces the output file.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    buffer = io.BytesIO()
    if fmt == "jpeg":
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    elif fmt == "png":
        rgb.save(buffer, format="PNG")
    elif fmt == "webp":
        rgb.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=4)
    else:
        raise ValueError(f"unsupported output format {fmt!r}; expected jpeg, png or webp")
    return buffer.getvalue()
