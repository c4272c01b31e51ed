"""The ONE request/response schema. Compatibility surfaces translate onto it.

Requests are pydantic (every error at once, with the offending value); responses
are msgspec structs (the hot path renders them).
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common import media
from providers.base import GenerationRequest

MIN_SIDE, MAX_SIDE = 256, 1536
# Request images (`image`, `mask_image`); the checks are in proxy/api/inputs.py.
IMAGE_MIN_SIDE, IMAGE_MAX_SIDE = 64, 4096
IMAGE_MAX_PIXELS = 4096 * 4096  # 16,777,216: decoded, ~64 MiB as RGBA
IMAGE_MAX_BYTES = 12 * 1024 * 1024  # decoded bytes of one data URI (the body cap is 16 MiB)
IMAGE_URL_MAX_CHARS = 4096
IMAGE_FIELDS = ("image", "mask_image")
IMAGE_SIZE_RANGE = (
    f"each side {IMAGE_MIN_SIDE}..{IMAGE_MAX_SIDE} pixels, "
    f"at most {IMAGE_MAX_PIXELS} pixels in all"
)
MAX_SEED = 2_147_483_647
MAX_PROMPT_CHARS = 20_000
_SIZE_RE = re.compile(r"^\s*(\d{2,5})\s*[*xX]\s*(\d{2,5})\s*$")

# What the 422 says is allowed, per field (the union of both seeds' ranges).
ALLOWED: dict[str, str] = {
    "model": "a model listed by GET /v1/models",
    "prompt": f"a non-empty string of at most {MAX_PROMPT_CHARS} characters",
    "image": (
        "an http(s) URL of a public host (no user:password@, no private, loopback, "
        "link-local or reserved address), or a data:image/<jpeg|png|gif|webp>;base64 URI "
        f"of a complete image ({IMAGE_SIZE_RANGE}, at most {IMAGE_MAX_BYTES} bytes)"
    ),
    "mask_image": (
        "the same as image, sent together with image; when both are data URIs, "
        "of the same width and height"
    ),
    "strength": "a number from 0 to 1",
    "size": f"'W*H' (or 'WxH'), each side {MIN_SIDE}..{MAX_SIDE}",
    "num_inference_steps": "an integer from 1 to 50",
    "guidance_scale": "a number from 1 to 20",
    "num_images": "an integer from 1 to 4",
    "seed": f"an integer from -1 to {MAX_SEED} (-1: random)",
    "output_format": "one of jpeg, png, webp",
    "enable_base64_output": "true or false",
    "enable_safety_checker": "true or false",
    "enable_sync_mode": "true or false",
    "providers": "a non-empty list of provider names from GET /v1/models, tried in that order",
    "webhook": (
        "an http(s) URL (no user:password@) of a host the proxy may reach: public "
        "addresses only unless webhook_allow_private is set"
    ),
    "webhook_events_filter": "a non-empty list of start, output, completed (default [completed])",
}


def parse_size(value: str) -> tuple[int, int]:
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError("size must look like 1024*1024")
    w, h = int(m.group(1)), int(m.group(2))
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
        raise ValueError(f"each side must be {MIN_SIDE}..{MAX_SIDE}")
    return w, h


_URL_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def _check_image_ref(value: str | None) -> str | None:
    """The shape of an image reference; no decoding, no DNS. The content (real
    image, limits, address policy) is checked by proxy/api/inputs.py."""
    if value is None or value == "":  # WaveSpeed's own example sends "image": ""
        return None
    if value[:5].lower() == "data:":
        comma = value.find(",", 0, 256)
        params = [p.strip().lower() for p in value[5:comma].split(";")] if comma > 0 else []
        if len(params) < 2 or params[-1] != "base64":
            raise ValueError("data URI must look like data:image/png;base64,<payload>")
        if media.format_for_mime(params[0]) is None:
            raise ValueError(
                f"data URI type {params[0][:64]!r} is not accepted: send image/jpeg, "
                "image/png, image/gif or image/webp (SVG and other types are refused)"
            )
        return value
    if len(value) > IMAGE_URL_MAX_CHARS:
        raise ValueError(f"URL is longer than {IMAGE_URL_MAX_CHARS} characters")
    if not re.match(r"^https?://", value, re.IGNORECASE):
        raise ValueError("must be an http(s) URL or a data:image URI")
    try:
        media.parse_http_url(value)
    except media.MediaError as exc:
        raise ValueError(exc.reason) from exc
    return value


def redact_image_ref(value: Any) -> Any:
    """An image value as it may be echoed back: credentials in a URL masked."""
    if isinstance(value, str) and value[:5].lower() != "data:":
        return _URL_USERINFO.sub(r"\1***@", value, count=1)
    return value


WebhookEvent = Literal["start", "output", "completed"]


def _completed_only() -> list[WebhookEvent]:
    return ["completed"]


class GenerateRequest(BaseModel):
    """POST /v1/predictions. Every input of both seeds, with their defaults."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    model: str = "flux-dev"
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    image: str | None = None
    mask_image: str | None = None
    strength: float = Field(default=0.8, ge=0.0, le=1.0)
    size: str = "1024*1024"
    num_inference_steps: int = Field(default=28, ge=1, le=50)
    guidance_scale: float = Field(default=3.5, ge=1.0, le=20.0)
    num_images: int = Field(default=1, ge=1, le=4)
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED)
    output_format: Literal["jpeg", "png", "webp"] = "jpeg"
    enable_base64_output: bool = False
    enable_safety_checker: bool = True
    enable_sync_mode: bool = False
    # Pin or exclude: only these providers, in this order (replaces the route's chain).
    providers: list[str] | None = Field(default=None, min_length=1, max_length=16)
    # Replicate's webhooks: the prediction is POSTed there, signed (Standard Webhooks),
    # on each of these events; the address rules are checked at admission.
    webhook: str | None = Field(default=None, max_length=IMAGE_URL_MAX_CHARS)
    webhook_events_filter: list[WebhookEvent] = Field(
        default_factory=_completed_only, min_length=1, max_length=3)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v

    @field_validator("image", "mask_image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        return _check_image_ref(v)

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        w, h = parse_size(v)
        return f"{w}*{h}"

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("providers must not repeat a name")
        return v

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not re.match(r"^https?://", v, re.IGNORECASE):
            raise ValueError("must be an http(s) URL")
        try:
            media.parse_http_url(v)
        except media.MediaError as exc:
            raise ValueError(exc.reason) from exc
        return v

    @field_validator("webhook_events_filter")
    @classmethod
    def _events(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("webhook_events_filter must not repeat an event")
        return v

    @model_validator(mode="after")
    def _mask_needs_image(self) -> GenerateRequest:
        if self.mask_image and not self.image:
            raise ValueError("mask_image needs image (inpainting edits an image)")
        return self

    def to_generation(self, seed: int) -> GenerationRequest:
        w, h = parse_size(self.size)
        return GenerationRequest(
            prompt=self.prompt,
            seed=seed,
            image=self.image,
            mask_image=self.mask_image,
            strength=self.strength,
            width=w,
            height=h,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            num_images=self.num_images,
            output_format=self.output_format,
            enable_safety_checker=self.enable_safety_checker,
            enable_base64_output=self.enable_base64_output,
            enable_sync_mode=self.enable_sync_mode,
        )


_GEN_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationRequest))


def generation_from_stored(request: dict[str, Any]) -> GenerationRequest:
    """Rebuild the provider request from a Prediction row's `request` column
    (which also carries routing choices such as `providers`)."""
    return GenerationRequest(**{k: v for k, v in request.items() if k in _GEN_FIELDS})


# --------------------------------------------------------------------------- errors


class FieldError(msgspec.Struct):
    field: str
    reason: str
    value: Any = None
    allowed: str | None = None


def _preview(value: Any) -> Any:
    """Echo the value back, but not a megabyte of base64."""
    if isinstance(value, str) and len(value) > 120:
        return value[:100] + f"... ({len(value)} chars)"
    if isinstance(value, (list, dict)) and len(str(value)) > 200:
        return f"<{type(value).__name__} of {len(value)} items>"
    return value


def field_errors(exc: ValidationError) -> list[FieldError]:
    out = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        name = ".".join(loc) or "body"
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        top = loc[0] if loc else ""
        value = err.get("input")
        if top in IMAGE_FIELDS:
            value = redact_image_ref(value)
        value = _preview(value) if loc else None
        if not loc and "mask_image" in reason:
            name, top = "mask_image", "mask_image"
        out.append(FieldError(field=name, reason=reason, value=value, allowed=ALLOWED.get(top)))
    return out


# --------------------------------------------------------------------------- responses


def usd(micro: int) -> str:
    """Exact decimal string of a micro-USD amount: 12000 -> '0.012000'."""
    whole, frac = divmod(abs(micro), 1_000_000)  # integers: no Decimal context per call
    return f"{'-' if micro < 0 else ''}{whole}.{frac:06d}"


class Urls(msgspec.Struct):
    get: str
    cancel: str


class AttemptView(msgspec.Struct):
    provider: str
    upstream_id: str | None
    status: str
    error: str | None
    error_kind: str | None
    latency_ms: int | None
    cost_micro_usd: int
    cost_usd: str
    created_at: datetime
    completed_at: datetime | None


class Progress(msgspec.Struct):
    step: int  # denoising steps done
    total: int


class PredictionView(msgspec.Struct):
    id: str
    model: str
    status: Literal["queued", "processing", "completed", "failed", "canceled"]
    outputs: list[str]
    has_nsfw_contents: list[bool]
    seed: int
    provider: str | None
    attempts: list[AttemptView]
    cost_micro_usd: int
    cost_usd: str
    error: str | None
    error_kind: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    timings: dict[str, int]
    urls: Urls
    # A cancel was asked and is durable; while `status` is not yet `canceled`, the
    # attempts show what is still upstream (the driving replica is stopping it).
    cancel_requested: bool = False
    # The wire format the request came in: native, openai, wavespeed or vibedream.
    surface: str = "native"
    # While running, where the upstream reports steps (our GPU worker); else null.
    progress: Progress | None = None


class PredictionList(msgspec.Struct):
    data: list[PredictionView]
    next_cursor: str | None


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    details: list[FieldError] | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
