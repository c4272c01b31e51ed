"""Request images (`image`, `mask_image`): checked before anything is written or sent.

The schema (proxy/schema.py) has already checked their shape (an http(s) URL
without credentials, or a ``data:image/<type>;base64,`` URI of one of the four
types). Here the content and the address policy, which need decoding or DNS:

* data URIs: strict base64, the declared type is what the bytes are, fully
  decoded by Pillow within the limits below (a decompression bomb costs only
  its header; a truncated file is refused). Decoding runs in a worker thread,
  its memory (payload, bytes, pixels) reserved first from the process's decode
  budget (``max_inflight_decode_bytes``, common/media/budget.py): concurrent
  requests wait their turn, at most ``DECODE_WAIT_S``, then get 503 (the server
  is busy; the image is fine). One that could never fit is a 422.
* URLs: the same :class:`~common.media.OutboundGuard` the proxy's own fetches
  use, strict (public addresses only): no private, loopback, link-local,
  reserved, multicast or unspecified address, by literal (every IPv4 spelling
  a resolver reads: ``127.1``, ``0x7f.1``, ``2130706433``) or by resolution
  (every answer; async, bounded by ``RESOLVE_TIMEOUT_S``). The proxy does not
  fetch client URLs here: redirects are re-checked, hop by hop, where a fetch
  happens (``common.media.download``: our worker's input fetches); third-party
  providers fetch from their own network.
* the mask: decodable like the image and, when both are inline, the same
  width and height (inpainting pairs pixels; a URL pair is not fetched here).

Whether a provider takes data URIs at all (VibeDream needs public URLs) is the
router's capability filter (``Capabilities.requires_public_image_urls``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from litestar.exceptions import ServiceUnavailableException

from common import media
from common.logging import get_logger
from proxy.schema import (
    ALLOWED,
    IMAGE_MAX_BYTES,
    IMAGE_MAX_PIXELS,
    IMAGE_MAX_SIDE,
    IMAGE_MIN_SIDE,
    FieldError,
    GenerateRequest,
    redact_image_ref,
)

RESOLVE_TIMEOUT_S = 3.0
DECODE_WAIT_S = 10.0  # longest a request waits for decode memory before its 503

log = get_logger("flux_proxy.api")


def _preview(value: str) -> str:
    value = redact_image_ref(value)
    return value if len(value) <= 120 else value[:100] + f"... ({len(value)} chars)"


@dataclass(frozen=True)
class RequestImageChecker:
    """Checks a parsed request's images; the app may replace it (tests inject a
    guard with a fake resolver: ``app.state.image_checker``)."""

    guard: media.OutboundGuard = field(
        default_factory=lambda: media.OutboundGuard(resolve_timeout_s=RESOLVE_TIMEOUT_S))
    min_side: int = IMAGE_MIN_SIDE
    max_side: int = IMAGE_MAX_SIDE
    max_pixels: int = IMAGE_MAX_PIXELS
    max_bytes: int = IMAGE_MAX_BYTES
    # None: the process-wide decode budget (media.budget.decoding()).
    budget: media.ByteBudget | None = None
    decode_wait_s: float = DECODE_WAIT_S

    async def check(self, req: GenerateRequest) -> list[FieldError]:
        """Every problem with `image` / `mask_image`; empty when both are fine."""
        named = [(name, value) for name, value in (("image", req.image),
                                                   ("mask_image", req.mask_image)) if value]
        if not named:
            return []
        results = await asyncio.gather(*(self._check_one(n, v) for n, v in named))
        errors = [err for _, err in results if err is not None]
        infos = {name: info for (name, _), (info, _) in zip(named, results, strict=True)
                 if info is not None}
        image, mask = infos.get("image"), infos.get("mask_image")
        if image is not None and mask is not None and (image.width, image.height) != (
                mask.width, mask.height):
            errors.append(FieldError(
                field="mask_image",
                reason=f"mask is {mask.width}x{mask.height} pixels but image is "
                       f"{image.width}x{image.height}; they must be the same size",
                value=_preview(req.mask_image or ""), allowed=ALLOWED["mask_image"]))
        return errors

    async def _check_one(
        self, name: str, value: str
    ) -> tuple[media.ImageInfo | None, FieldError | None]:
        """(info of an inline image, None) or (None, the error); (None, None): a good URL."""
        inline = value[:5].lower() == "data:"
        try:
            if not inline:
                await self.guard.resolve(value)
                return None, None
            _data, info = await media.inspect_data_uri_bounded(
                value, max_bytes=self.max_bytes, max_pixels=self.max_pixels,
                max_side=self.max_side, budget=self.budget, wait_s=self.decode_wait_s)
        except media.BudgetWait as exc:
            log.warning("request.image_decode_busy", field=name, reason=exc.reason)
            raise ServiceUnavailableException(
                detail=f"{name}: the server is busy decoding other images; retry shortly",
                headers={"Retry-After": "1"}) from exc
        except media.TooLarge as exc:
            return None, self._error(name, value, exc.reason, size=True)
        except media.MediaError as exc:  # BlockedURL too
            if exc.detail:  # for operators only (e.g. the internal address a name resolved to)
                log.info("request.image_refused", field=name, reason=exc.reason,
                         detail=exc.detail)
            return None, self._error(name, value, exc.reason)
        if info.width < self.min_side or info.height < self.min_side:
            return None, self._error(
                name, value, f"image is {info.width}x{info.height} pixels; each side must "
                f"be at least {self.min_side}", size=True)
        return info, None

    def _error(self, name: str, value: str, reason: str, *, size: bool = False) -> FieldError:
        allowed = ALLOWED[name]
        if size:
            allowed = (f"each side {self.min_side}..{self.max_side} pixels, at most "
                       f"{self.max_pixels} pixels in all, at most {self.max_bytes} bytes")
        return FieldError(field=name, reason=reason, value=_preview(value), allowed=allowed)


DEFAULT_CHECKER = RequestImageChecker()
