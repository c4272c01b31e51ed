"""The multipart body of OpenAI's ``POST /v1/images/edits``: its form fields, and its
image and mask files as the data URIs the unified schema takes.

Masks. OpenAI marks the area to edit with full transparency (alpha 0); FLUX paints
where the mask is white and keeps where it is black. A mask with transparency is
converted (alpha 0 -> white, anything else -> black, a grayscale PNG); a mask
without an alpha channel, or whose alpha is opaque everywhere, is already a FLUX
mask and passes unchanged. The conversion decodes pixels: it runs in a worker
thread, its memory reserved first from the process's decode budget
(common/media/budget.py), as the request-image checks do (proxy/api/inputs.py),
which then validate both data URIs fully before anything is written.
"""

from __future__ import annotations

import asyncio
import io
import re
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.datastructures import UploadFile
from litestar.exceptions import ServiceUnavailableException

from common import media
from proxy.api.inputs import DECODE_WAIT_S
from proxy.schema import IMAGE_MAX_PIXELS, IMAGE_MAX_SIDE, MAX_SIDE, MIN_SIDE


class FormError(ValueError):
    """A bad part of the form: which OpenAI parameter, and why."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code


@dataclass(frozen=True)
class EditImages:
    image: str  # data URI of the image, labelled with its real type
    mask: str | None  # data URI of a FLUX mask (white = regenerate), or None
    width: int
    height: int

    @property
    def auto_size(self) -> str | None:
        """``size="auto"``: the image's own size, when a FLUX provider can make it."""
        if MIN_SIDE <= self.width <= MAX_SIDE and MIN_SIDE <= self.height <= MAX_SIDE:
            return f"{self.width}*{self.height}"
        return None


# Form values are strings; these become what the JSON body would carry.
_INTS = frozenset({"n", "num_inference_steps", "seed", "partial_images", "output_compression",
                   "frame_count", "frame_duration_ms"})
_FLOATS = frozenset({"strength", "guidance_scale"})
_BOOLS = frozenset({"enable_safety_checker", "stream"})
_INT_RE = re.compile(r"^[+-]?\d{1,12}$")


def _coerce(name: str, value: str) -> Any:
    """A form string as its JSON type; left as it is when it does not parse (the
    validation then names the parameter)."""
    if value == "":
        return None  # the SDK's serialisation of None
    if name in _INTS and _INT_RE.match(value):
        return int(value)
    if name in _FLOATS:
        try:
            return float(value)
        except ValueError:
            return value
    if name in _BOOLS and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


async def read_form(request: Request[Any, Any, Any]
                    ) -> tuple[dict[str, Any], bytes, bytes | None]:
    """(fields, image bytes, mask bytes or None) of an edit request, or FormError.
    The body is bounded by the app's max_body_bytes (413 while it is read)."""
    if request.content_type[0] != "multipart/form-data":
        raise FormError("image", "Send the edit as multipart/form-data (image, mask and "
                        "prompt as form fields), as the OpenAI SDK does.")
    form = await request.form()
    fields: dict[str, Any] = {}
    images: list[UploadFile] = []
    mask: UploadFile | None = None
    for key, value in form.multi_items():
        if key in ("image", "image[]"):  # one file: "image"; a list: "image[]" each
            if not isinstance(value, UploadFile):
                raise FormError("image", "'image' must be an uploaded file")
            images.append(value)
        elif key == "mask":
            if isinstance(value, UploadFile):
                mask = value
            elif value:
                raise FormError("mask", "'mask' must be an uploaded file")
        elif isinstance(value, UploadFile):
            raise FormError(key, f"Unexpected file in parameter '{key}'",
                            code="unknown_parameter")
        elif key.endswith("[]"):  # a list sent through extra_body, e.g. providers
            fields.setdefault(key[:-2], []).append(value)
        else:
            fields[key] = _coerce(key, value)
    if not images:
        raise FormError("image", "Missing required parameter: 'image'",
                        code="missing_required_parameter")
    if len(images) > 1:
        raise FormError("image", f"{len(images)} images were sent; flux-proxy edits one "
                        "image per request (FLUX image-to-image takes one input image)")
    image_bytes = await images[0].read()
    mask_bytes = await mask.read() if mask is not None else None
    return fields, image_bytes, mask_bytes


def _header(param: str, data: bytes) -> tuple[str, int, int]:
    if not data:
        raise FormError(param, f"'{param}' is an empty file")
    try:
        return media.read_header(data, max_pixels=IMAGE_MAX_PIXELS, max_side=IMAGE_MAX_SIDE)
    except media.MediaError as exc:
        raise FormError(param, f"Invalid '{param}': {exc.reason}") from exc


async def edit_images(image: bytes, mask: bytes | None) -> EditImages:
    """The files as data URIs (mask in FLUX's convention), or FormError. The full
    decode and limits are the request-image checks' (`admit`)."""
    fmt, width, height = _header("image", image)
    mask_uri = None
    if mask is not None:
        mask_fmt, mw, mh = _header("mask", mask)
        if (mw, mh) != (width, height):
            raise FormError("mask", f"Invalid 'mask': it is {mw}x{mh} pixels but the image "
                            f"is {width}x{height}; they must be the same size")
        flux_mask = await _convert_mask(mask, mask_fmt, mw, mh)
        mask_uri = await asyncio.to_thread(media.to_data_uri, flux_mask or mask,
                                           "png" if flux_mask else mask_fmt)
    image_uri = await asyncio.to_thread(media.to_data_uri, image, fmt)
    return EditImages(image=image_uri, mask=mask_uri, width=width, height=height)


async def _convert_mask(data: bytes, fmt: str, width: int, height: int) -> bytes | None:
    # Decoding, an RGBA copy, the alpha band, the black/white band and its PNG.
    cost = media.decode_cost(fmt, width, height) + 7 * width * height
    try:
        return await media.budget.decoding().run(
            cost, openai_mask_to_flux, data, what="converting the mask", wait_s=DECODE_WAIT_S)
    except media.BudgetWait as exc:
        raise ServiceUnavailableException(
            detail="mask: the server is busy decoding other images; retry shortly",
            headers={"Retry-After": "1"}) from exc
    except media.MediaError as exc:  # OverBudget too
        raise FormError("mask", f"Invalid 'mask': {exc.reason}") from exc


def openai_mask_to_flux(data: bytes) -> bytes | None:
    """An OpenAI mask (transparent = edit) as a FLUX mask PNG (white = edit); None
    when the mask has no transparency (taken as a FLUX mask already). CPU-bound."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("RGBA", "LA", "PA") and "transparency" not in im.info:
                return None
            rgba = im if im.mode in ("RGBA", "LA") else im.convert("RGBA")
            alpha = rgba.getchannel("A")
    except Exception as exc:  # any decoder failure on untrusted input is a refusal
        raise media.MediaError("not a valid image (corrupt or truncated)") from exc
    if alpha.getextrema()[0] == 255:  # opaque everywhere: nothing marked transparent
        return None
    # OpenAI edits where alpha is zero (fully transparent); semi-transparent edges keep.
    flux = alpha.point([255] + [0] * 255)
    out = io.BytesIO()
    flux.save(out, "PNG")
    return out.getvalue()
