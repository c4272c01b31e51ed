"""Small real images for the simulators: deterministic from (seed, index), cached.

Each image is a flat colour with a centred block of the complementary colour, at the
requested size and format. The colour comes from a palette of `PALETTE_SIZE` hues, so
that a benchmark running with random seeds still hits the LRU after a short warm-up:
images of different seeds may look alike; the images of one job never do.
"""

from __future__ import annotations

import base64
import colorsys
import io
from functools import lru_cache

from PIL import Image, ImageDraw

PALETTE_SIZE = 64
CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}


def colour_index(seed: int, index: int) -> int:
    """Palette slot of image `index` of a job with `seed`: distinct for indices 0..3."""
    mixed = (seed * 2654435761) & 0xFFFFFFFF
    return ((mixed >> 16) + index * (PALETTE_SIZE // 4)) % PALETTE_SIZE


def _rgb(slot: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(slot / PALETTE_SIZE, 0.65, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


@lru_cache(maxsize=256)
def _render(slot: int, width: int, height: int, fmt: str) -> bytes:
    background = _rgb(slot)
    block = _rgb((slot + PALETTE_SIZE // 2) % PALETTE_SIZE)
    image = Image.new("RGB", (width, height), background)
    ImageDraw.Draw(image).rectangle(
        (width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=block
    )
    out = io.BytesIO()
    if fmt == "jpeg":
        image.save(out, "JPEG", quality=85)
    elif fmt == "png":
        image.save(out, "PNG", compress_level=1)
    elif fmt == "webp":
        image.save(out, "WEBP", quality=80, method=0)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return out.getvalue()


@lru_cache(maxsize=128)
def _render_b64(slot: int, width: int, height: int, fmt: str) -> str:
    return base64.b64encode(_render(slot, width, height, fmt)).decode("ascii")


def render_image(seed: int, index: int, width: int, height: int, fmt: str) -> bytes:
    """Encoded bytes of image `index` of a job (cached)."""
    return _render(colour_index(seed, index), width, height, fmt)


def render_base64(seed: int, index: int, width: int, height: int, fmt: str) -> str:
    """The same image as a plain base64 string, no `data:` prefix (cached)."""
    return _render_b64(colour_index(seed, index), width, height, fmt)
