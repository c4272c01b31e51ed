"""Request image inputs -> checked PIL images the FLUX pipelines can take.

Every input goes through :func:`common.media.fetch_image` first: a ``data:``
URI or an http(s) URL behind the SSRF guard, size-capped, fully decoded and
checked as a real JPEG/PNG/GIF/WebP of sane dimensions. Only then is it
opened here and normalised (orientation, RGB, size).

Geometry: image inputs are *stretched* to the requested output size (no
crop, no letterbox), as diffusers' own ``VaeImageProcessor`` does; the mask
gets exactly the same treatment, so the two stay aligned.
"""

from __future__ import annotations

import io

import httpx
from PIL import Image, ImageOps

from common.media import MediaError, OutboundGuard, fetch_image

MASK_THRESHOLD = 128  # grey >= 128 -> white (repaint), below -> black (keep)


async def load_input_image(
    value: str,
    *,
    field: str,
    client: httpx.AsyncClient,
    guard: OutboundGuard,
    max_bytes: int,
    timeout_s: float,
    max_pixels: int = 50_000_000,
    max_side: int = 8192,
    as_mask: bool = False,
) -> Image.Image:
    """Fetch and validate ``value`` (data URI or URL); return it as an RGB image,
    or with ``as_mask`` upright but otherwise as sent, so that :func:`prepare_mask`
    can read transparency as "keep" (flattening onto white would mean "repaint").

    Raises :class:`common.media.MediaError` (or a subclass: ``BlockedURL``,
    ``TooLarge``) with ``field`` set, for anything that is not a usable image.
    """
    data, _info = await fetch_image(
        client,
        value,
        field=field,
        max_bytes=max_bytes,
        timeout_s=timeout_s,
        guard=guard,
        max_pixels=max_pixels,
        max_side=max_side,
    )
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # first frame of an animated GIF/WebP
            return ImageOps.exif_transpose(opened) if as_mask else to_rgb(opened)
    except MediaError:
        raise
    except Exception as exc:  # already validated; a failure here is still a bad input
        raise MediaError(
            "image could not be decoded", field=field, detail=f"{type(exc).__name__}: {exc}"
        ) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB copy of ``image``: EXIF orientation applied, palettes expanded,
    transparency composited over white."""
    return _flatten(image, background=(255, 255, 255)).convert("RGB")


def _flatten(image: Image.Image, *, background: tuple[int, int, int]) -> Image.Image:
    """``image`` upright (EXIF) and without alpha: transparent pixels become ``background``."""
    upright = ImageOps.exif_transpose(image)
    if upright.mode == "P":
        upright = upright.convert("RGBA")
    if upright.mode not in ("RGBA", "LA", "PA"):
        return upright
    rgba = upright.convert("RGBA")
    flat = Image.new("RGB", rgba.size, background)
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def resize_for(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` stretched to exactly ``width`` x ``height`` (Lanczos); as is if already so."""
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, not {width}x{height}")
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def prepare_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The inpainting mask as a *binary* ``L`` image of ``size`` (the image's size).

    White (255) marks pixels to regenerate, black (0) pixels to keep, as both
    upstream contracts define it. Colour masks are converted to grey;
    transparent pixels count as black (keep). The mask is resized with
    bilinear filtering and then thresholded at 128, so edges stay crisp: the
    FLUX inpaint pipeline binarises at 0.5 anyway, doing it here makes what
    is sent to the pipeline exactly what is used.
    """
    grey = _flatten(mask, background=(0, 0, 0)).convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    return grey.point(lambda value: 255 if value >= MASK_THRESHOLD else 0)
