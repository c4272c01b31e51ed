"""``data:`` URIs (RFC 2397) and bare base64 from upstreams."""

from __future__ import annotations

import base64
import binascii
import logging
import re
from urllib.parse import unquote, unquote_to_bytes

from . import budget as _budget
from ._errors import MediaError, TooLarge
from ._images import (
    FORMAT_LABELS,
    MIME_TYPES,
    NOT_AN_IMAGE,
    ImageInfo,
    decode_cost,
    format_for_mime,
    inspect_image,
    normalize_format,
    read_header,
    sniff_format,
)
from ._images import to_data_uri as _to_data_uri

logger = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"\s+")
_STRICT_B64 = re.compile(r"[A-Za-z0-9+/]*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_ACCEPTED = "image/jpeg, image/png, image/webp or image/gif"


def _b64decode(text: str) -> bytes:
    """Strict base64 after forgiving the usual transport damage.

    Forgiven: whitespace/newlines, missing ``=`` padding, the URL-safe alphabet,
    percent-encoding (``%2B``). Anything else outside the alphabet is an error.
    """
    text = _WHITESPACE.sub("", text)
    if "%" in text:
        text = unquote(text)
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError("payload is not valid base64") from exc


def _b64decode_strict(text: str) -> bytes:
    """RFC 4648 section 4 exactly: standard alphabet, ``=`` padding, no whitespace."""
    if len(text) % 4 or not _STRICT_B64.fullmatch(text):
        raise MediaError(
            "data URI payload is not valid base64 "
            "(standard alphabet A-Z a-z 0-9 + /, padded with =, no whitespace)"
        )
    try:
        # The regex has checked every character: decode the str itself (an ASCII
        # str is read in place; base64.b64decode would first copy it to bytes).
        return binascii.a2b_base64(text)
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - the regex is stricter
        raise MediaError("data URI payload is not valid base64") from exc


def parse_data_uri(uri: str, *, max_bytes: int, strict: bool = False) -> tuple[bytes, str]:
    """Decode an image ``data:`` URI into ``(bytes, mime)``.

    The declared media type must be one of the four image types (normalised,
    e.g. ``image/jpg`` -> ``image/jpeg``); the bytes themselves are not decoded
    here, run :func:`inspect_image` on them. The size limit is checked on the
    encoded length *before* decoding, then exactly on the decoded bytes.

    ``strict`` (client input): ``;base64`` is required and the payload must be
    canonical base64 (see :func:`_b64decode_strict`); the default forgives the
    transport damage upstreams are known for.
    """
    head, sep, payload = uri.partition(",")
    if not sep or head[:5].lower() != "data:":
        raise MediaError("malformed data URI")
    params = [p.strip() for p in head[5:].split(";")]
    mime = params[0].lower() or "text/plain"  # RFC 2397 default
    is_base64 = len(params) > 1 and params[-1].lower() == "base64"
    fmt = format_for_mime(mime)
    if fmt is None:
        raise MediaError(f"data URI must carry {_ACCEPTED}, not {mime[:64]!r}")
    if strict and not is_base64:
        raise MediaError("data URI must be base64-encoded (data:<type>;base64,...)")
    if is_base64:
        # 4 base64 chars -> 3 bytes; whitespace only makes the estimate larger.
        if (len(payload) // 4) * 3 - 2 > max_bytes:
            raise TooLarge(f"data URI payload exceeds {max_bytes} bytes")
        if strict:
            data = _b64decode_strict(payload)
        else:
            try:
                data = _b64decode(payload)
            except MediaError as exc:
                raise MediaError("data URI payload is not valid base64") from exc
    else:
        # Percent-encoded octets: every decoded byte needs 1 to 3 characters.
        if len(payload) > 3 * max_bytes:
            raise TooLarge(f"data URI payload exceeds {max_bytes} bytes")
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise TooLarge(f"data URI payload exceeds {max_bytes} bytes")
    if not data:
        raise MediaError("data URI payload is empty")
    return data, MIME_TYPES[fmt]


def b64_to_data_uri(b64: str, *, expected: str | None = None) -> str:
    """Turn an upstream's base64 image into a data URI labelled with its *real* format.

    Accepts bare base64 (what WaveSpeed's ``enable_base64_output`` is known to
    return) and, leniently, an existing ``data:...;base64,`` URI whose label is
    then re-derived from the bytes. ``expected`` (the requested output format)
    is advisory: a mismatch is logged, the sniffed format wins, because a data
    URI that lies about its type breaks browsers.
    """
    text = b64.strip()
    if text[:5].lower() == "data:":
        head, sep, text = text.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise MediaError("malformed base64 data URI from upstream")
    if not text:
        raise MediaError("upstream returned an empty base64 image")
    data = _b64decode(text)
    fmt = sniff_format(data)
    if fmt is None:
        raise MediaError(f"upstream base64 payload is {NOT_AN_IMAGE}")
    if expected is not None and normalize_format(expected) != fmt:
        logger.info("upstream image format differs: expected %s, got %s", expected, fmt)
    return _to_data_uri(data, fmt)


def inspect_data_uri(
    uri: str, *, max_bytes: int, max_pixels: int = 50_000_000, max_side: int = 8192
) -> tuple[bytes, ImageInfo]:
    """A client's image ``data:`` URI -> ``(bytes, info)``, or :class:`MediaError`.

    Strict base64 (:func:`parse_data_uri` with ``strict=True``); the declared
    type must be what the bytes really are (``image/png`` holding a JPEG is
    refused: a label that lies breaks whoever trusts it downstream); then the
    image is fully decoded within the pixel limits (:func:`inspect_image`).
    CPU-bound: call it through ``asyncio.to_thread`` from async code.
    """
    data, mime = parse_data_uri(uri, max_bytes=max_bytes, strict=True)
    declared = format_for_mime(mime)
    found = sniff_format(data)
    if found is None:
        raise MediaError(f"data URI payload is {NOT_AN_IMAGE}")
    if found != declared:
        raise MediaError(
            f"data URI declares {mime} but its bytes are a {FORMAT_LABELS[found]} image"
        )
    return data, inspect_image(data, max_pixels=max_pixels, max_side=max_side)


# Base64 characters decoded to read an inline image's header before reserving its
# decode: PNG, GIF and WebP headers are in the first 30 bytes; a JPEG's size comes
# after its APPn segments (EXIF, ICC), usually within this.
_HEADER_PREFIX_CHARS = 64 * 1024


def data_uri_decode_cost(uri: str, *, max_bytes: int, max_pixels: int = 50_000_000,
                         max_side: int = 8192) -> int:
    """An upper bound of the memory :func:`inspect_data_uri` needs for ``uri``, beside
    ``uri`` itself: the payload's copy and its decoded bytes (``parse_data_uri``),
    then the decoded bytes and the pixels (``inspect_image``); whichever is larger.

    The pixels come from the header, read from the first ``_HEADER_PREFIX_CHARS``
    of the payload; when they are not enough (a JPEG with a large EXIF block), the
    largest image the limits allow is assumed. Cheap: no copy of the payload.
    """
    comma = uri.find(",")
    if comma < 0:
        return 0  # malformed: refused before anything is decoded
    chars = len(uri) - comma - 1
    decoded = (chars // 4) * 3 + 3
    if decoded - 5 > max_bytes:  # refused by parse_data_uri's estimate, before decoding
        return chars
    pixels = _pixel_cost(uri[comma + 1:comma + 1 + _HEADER_PREFIX_CHARS],
                         max_pixels=max_pixels, max_side=max_side)
    return decoded + max(chars, pixels)


def _pixel_cost(prefix: str, *, max_pixels: int, max_side: int) -> int:
    prefix = prefix[: len(prefix) // 4 * 4]
    if not _STRICT_B64.fullmatch(prefix):
        return 0  # the payload is not canonical base64: refused before decoding
    head = binascii.a2b_base64(prefix)
    fmt = sniff_format(head)
    if fmt is None:
        return 0  # refused by the sniff, before any pixel is decoded
    try:
        fmt, width, height = read_header(head, max_pixels=max_pixels, max_side=max_side)
    except TooLarge:
        return 0  # refused by the header check, before any pixel is decoded
    except MediaError:
        return decode_cost(fmt, max_pixels, 1)  # the size is further in: assume the largest
    return decode_cost(fmt, width, height)


async def inspect_data_uri_bounded(
    uri: str, *, max_bytes: int, max_pixels: int = 50_000_000, max_side: int = 8192,
    budget: _budget.ByteBudget | None = None, wait_s: float | None = None,
) -> tuple[bytes, ImageInfo]:
    """:func:`inspect_data_uri` in a worker thread, its memory
    (:func:`data_uri_decode_cost`) reserved from ``budget`` (default: the process's
    ``budget.decoding()``) first and held until the thread ends. Waiting longer
    than ``wait_s`` is :class:`~common.media.budget.BudgetWait`; an image that could
    never fit is :class:`~common.media.budget.OverBudget` (a :class:`TooLarge`)."""
    pool = budget if budget is not None else _budget.decoding()
    cost = data_uri_decode_cost(uri, max_bytes=max_bytes, max_pixels=max_pixels,
                                max_side=max_side)
    return await pool.run(cost, inspect_data_uri, uri, what="decoding the image",
                          wait_s=wait_s, max_bytes=max_bytes, max_pixels=max_pixels,
                          max_side=max_side)
