"""The provider interface: what every upstream adapter implements.

An adapter reads top to bottom as "map request, call, map response, map
errors". Cross-cutting behaviour (metrics, breakers, rate limits) wraps a
Provider from the outside; adapters stay small.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, SecretStr

from common import media

OutputFormat = Literal["jpeg", "png", "webp"]
Mode = Literal["text-to-image", "image-to-image", "inpainting"]


# --------------------------------------------------------------------------- request


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """The unified request as a provider sees it: validated, defaults applied.

    `seed` is always concrete here: the proxy draws one for -1 so that it can
    report the seed that made the image.
    """

    prompt: str
    seed: int
    image: str | None = None
    mask_image: str | None = None
    strength: float = 0.8
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    num_images: int = 1
    output_format: OutputFormat = "jpeg"
    enable_safety_checker: bool = True
    # What the client asked for; an adapter uses the upstream's native support
    # where it has it, and the proxy emulates the rest.
    enable_base64_output: bool = False
    enable_sync_mode: bool = False

    @property
    def size(self) -> str:
        return f"{self.width}*{self.height}"

    @property
    def mode(self) -> Mode:
        if self.mask_image:
            return "inpainting"
        if self.image:
            return "image-to-image"
        return "text-to-image"

    def with_(self, **changes: object) -> GenerationRequest:
        return replace(self, **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- capabilities


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an upstream can do; the router filters on `unsupported_reason`."""

    sizes: frozenset[tuple[int, int]] | None = None  # None: any size in [min_side, max_side]
    min_side: int = 256
    max_side: int = 1536
    max_num_images: int = 4
    img2img: bool = True
    inpainting: bool = True
    output_formats: frozenset[str] = frozenset({"jpeg", "png", "webp"})
    native_sync: bool = False
    native_base64: bool = False
    native_nsfw_flags: bool = False
    requires_public_image_urls: bool = False  # data: URIs are not accepted upstream
    cancel: bool = False

    def unsupported_reason(self, req: GenerationRequest) -> str | None:
        """None when this upstream can serve `req`, else a sentence saying why not."""
        if self.sizes is not None:
            if (req.width, req.height) not in self.sizes:
                listed = ", ".join(f"{w}*{h}" for w, h in sorted(self.sizes))
                return f"size {req.size} is not one of {listed}"
        elif not (
            self.min_side <= req.width <= self.max_side
            and self.min_side <= req.height <= self.max_side
        ):
            return f"size {req.size} is outside {self.min_side}..{self.max_side} per side"
        if req.num_images > self.max_num_images:
            return f"num_images {req.num_images} exceeds {self.max_num_images}"
        if req.mode == "inpainting" and not self.inpainting:
            return "inpainting is not supported"
        if req.mode == "image-to-image" and not self.img2img:
            return "image-to-image is not supported"
        if req.output_format not in self.output_formats:
            return f"output_format {req.output_format} is not supported"
        if self.requires_public_image_urls:
            for name in ("image", "mask_image"):
                value = getattr(req, name)
                if value and not value.startswith(("http://", "https://")):
                    return f"{name} must be a public http(s) URL for this provider"
        return None

    def as_dict(self) -> dict[str, object]:
        return {
            "sizes": None if self.sizes is None else [f"{w}*{h}" for w, h in sorted(self.sizes)],
            "min_side": self.min_side,
            "max_side": self.max_side,
            "max_num_images": self.max_num_images,
            "img2img": self.img2img,
            "inpainting": self.inpainting,
            "output_formats": sorted(self.output_formats),
            "native_sync": self.native_sync,
            "native_base64": self.native_base64,
            "native_nsfw_flags": self.native_nsfw_flags,
            "requires_public_image_urls": self.requires_public_image_urls,
            "cancel": self.cancel,
        }


# --------------------------------------------------------------------------- upstream job


class JobStatus(enum.StrEnum):
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self is not JobStatus.PROCESSING


@dataclass(slots=True)
class UpstreamJob:
    """One upstream task as last seen. Adapters normalise everything here:
    outputs are URLs or `data:image/<fmt>;base64,` URIs, never bare base64."""

    upstream_id: str
    status: JobStatus
    poll_url: str | None = None
    outputs: list[str] = field(default_factory=list)
    has_nsfw_contents: list[bool] | None = None  # None: the upstream does not say
    error: str | None = None
    error_kind: ErrorKind | None = None  # set when status is FAILED
    upstream_code: int | None = None
    charged_micro_usd: int | None = None  # what the upstream said it charges, if it says
    inference_ms: int | None = None
    raw_status: str = ""
    # The upstream's own estimate of how long after the submit answered the job
    # can be done at the earliest (e.g. VibeDream's estimatedTime "5-15s" -> 5.0):
    # the first poll waits that long. None: the upstream gave no usable estimate.
    ready_after_s: float | None = None
    # (step, total) of a running job, where the upstream reports it (our GPU worker).
    progress: tuple[int, int] | None = None


# --------------------------------------------------------------------------- errors


class ErrorKind(enum.StrEnum):
    """Why an upstream call failed; decides failover and billing."""

    UNAVAILABLE = "unavailable"  # connect error, 5xx, upstream-internal failure
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"  # no answer before the upstream accepted (nothing exists upstream)
    OUTCOME_UNKNOWN = "outcome_unknown"  # request sent, answer lost: a task may exist
    MALFORMED = "malformed_response"
    AUTH = "auth"  # our key is wrong: this provider is misconfigured
    POLICY = "policy_refusal"  # content moderation
    INVALID_INPUT = "invalid_input"  # the request itself is bad (e.g. image unreachable)
    # Not an upstream's answer: the client key's budget cannot pay for another submit.
    BUDGET = "budget_exceeded"
    # Our own settings refused what the upstream did (e.g. an output host not in
    # asset_hosts): the message names the setting; the provider's health is untouched.
    CONFIG = "configuration_error"

    @property
    def retryable(self) -> bool:
        """Whether another provider may succeed where this one failed."""
        return self not in (ErrorKind.POLICY, ErrorKind.INVALID_INPUT, ErrorKind.BUDGET)


class ProviderError(Exception):
    """Base of the taxonomy. `kind` drives failover; the message is safe to show
    clients (adapters never put keys or full upstream bodies in it)."""

    kind: ClassVar[ErrorKind] = ErrorKind.UNAVAILABLE

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status_code: int | None = None,
        upstream_code: int | None = None,
        retry_after: float | None = None,
        final: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status_code = status_code
        self.upstream_code = upstream_code
        self.retry_after = retry_after
        # On a poll: the job is gone (e.g. its worker died), so polling again is
        # pointless; the attempt fails now and, if retryable, another provider is tried.
        self.final = final

    @property
    def retryable(self) -> bool:
        return self.kind.retryable


class UpstreamUnavailable(ProviderError):
    kind = ErrorKind.UNAVAILABLE


class RateLimited(ProviderError):
    kind = ErrorKind.RATE_LIMITED


class UpstreamTimeout(ProviderError):
    kind = ErrorKind.TIMEOUT


class OutcomeUnknown(ProviderError):
    """The submit was sent but no answer came back: the task may exist upstream.
    Never resubmit to the same provider; the caller decides what to do."""

    kind = ErrorKind.OUTCOME_UNKNOWN


class MalformedResponse(ProviderError):
    kind = ErrorKind.MALFORMED


class AuthFailed(ProviderError):
    kind = ErrorKind.AUTH


class PolicyRefusal(ProviderError):
    kind = ErrorKind.POLICY


class InvalidInput(ProviderError):
    kind = ErrorKind.INVALID_INPUT


class ConfigurationError(ProviderError):
    """Our configuration, not the upstream, stopped the call; says what to change."""

    kind = ErrorKind.CONFIG


ERRORS_BY_KIND: dict[ErrorKind, type[ProviderError]] = {
    cls.kind: cls
    for cls in (
        UpstreamUnavailable,
        RateLimited,
        UpstreamTimeout,
        OutcomeUnknown,
        MalformedResponse,
        AuthFailed,
        PolicyRefusal,
        InvalidInput,
        ConfigurationError,
    )
}


# --------------------------------------------------------------------------- settings


class ProviderSettings(BaseModel):
    """Settings every HTTP provider shares. Set from env and the TOML file."""

    enabled: bool = True
    base_url: str
    api_key: SecretStr | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)  # between bytes, per upstream call
    # How long a submit waits for its answer (headers and body) once the request is
    # sent. Both adapters' submits answer at once (the job runs upstream), so an
    # upstream silent past this is hung: the attempt is closed outcome-unknown (it
    # may have been accepted and billed) and the next provider is tried.
    submit_timeout_s: float = Field(default=5.0, gt=0)
    # Whole upstream call, however the bytes trickle (a read timeout alone can be
    # defeated by an upstream that sends one byte at a time).
    total_timeout_s: float = Field(default=60.0, gt=0)
    # The longest one job may run upstream before the attempt is given up.
    deadline_s: float = Field(default=300.0, gt=0)
    poll_initial_s: float = Field(default=0.25, gt=0)
    poll_max_s: float = Field(default=2.0, gt=0)
    poll_multiplier: float = Field(default=1.5, ge=1.0)
    max_connections: int = Field(default=200, ge=1)
    # Close idle pooled connections well before the upstream does (servers commonly
    # use 5 s): a submit sent on a connection the server is closing would otherwise
    # fail after sending, and such an outcome-unknown submit is never repeated.
    keepalive_expiry_s: float = Field(default=2.0, ge=0)
    # The connection pool's bookkeeping per request: false, httpcore's own (it
    # scans every connection, and polls each idle socket, on every request: its cost
    # grows with the connections open); true, a pass with the same rules that checks
    # only the connection it hands out (providers/_http.py, LeanConnectionPool).
    lean_pool: bool = True
    # Hosts the proxy downloads outputs from (base64 emulation). "*.x.com" matches subdomains.
    asset_hosts: list[str] = Field(default_factory=list)
    # Let those downloads reach private/loopback addresses (simulators, on-prem hosts).
    allow_private_asset_hosts: bool = False
    max_download_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    download_timeout_s: float = Field(default=30.0, gt=0)

    def missing(self, name: str) -> str | None:
        """Why this provider cannot be enabled as configured (None: it can)."""
        if self.api_key is None or not self.api_key.get_secret_value():
            return f"no API key (set {name.upper()}_API_KEY)"
        return None


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class Provider(Protocol):
    """One upstream. Implementations raise `ProviderError` subclasses only."""

    name: str
    capabilities: Capabilities
    settings: ProviderSettings

    async def submit(self, req: GenerationRequest) -> UpstreamJob:
        """Start a job. Returns it processing, or terminal when the upstream
        answered synchronously. Never retried internally: a task may exist."""
        ...

    async def poll(self, job: UpstreamJob) -> UpstreamJob:
        """Fetch the job's current state (safe to retry)."""
        ...

    async def cancel(self, job: UpstreamJob) -> bool:
        """Ask the upstream to stop the job; False when it cannot."""
        ...

    def attempt_cost_micro_usd(self, req: GenerationRequest, job: UpstreamJob | None) -> int:
        """What this attempt costs us, in micro-USD. `job` is None when the
        submit never got an answer."""
        ...

    async def download(self, url: str) -> tuple[bytes, str | None]:
        """Fetch one output (bytes, content-type), only from this provider's
        asset hosts, bounded in size and time."""
        ...

    async def download_to(self, url: str, sink: media.Sink) -> str | None:
        """The same download, each chunk awaited into `sink` as it arrives (never held
        whole); the content-type. An exception from `sink` propagates as it is."""
        ...

    def saturated(self) -> bool:
        """True when this provider's own capacity is full (e.g. every local
        worker's queue past its threshold): the router tries it last."""
        ...

    async def aclose(self) -> None: ...


class BaseProvider:
    """Defaults for the optional parts of `Provider`: no cancel, never saturated,
    no downloads, nothing to close. An adapter subclasses this and writes
    submit, poll and its price."""

    name: str
    capabilities: Capabilities
    settings: ProviderSettings

    async def submit(self, req: GenerationRequest) -> UpstreamJob:
        raise NotImplementedError

    async def poll(self, job: UpstreamJob) -> UpstreamJob:
        raise NotImplementedError

    async def cancel(self, job: UpstreamJob) -> bool:
        return False

    def attempt_cost_micro_usd(self, req: GenerationRequest, job: UpstreamJob | None) -> int:
        if job is not None and job.charged_micro_usd is not None:
            return job.charged_micro_usd
        return 0

    async def download(self, url: str) -> tuple[bytes, str | None]:
        raise MalformedResponse(f"{self.name}: outputs cannot be downloaded from this provider",
                                provider=self.name)

    async def download_to(self, url: str, sink: media.Sink) -> str | None:
        """By default the whole download, then one chunk: adapters over HTTP stream."""
        data, content_type = await self.download(url)
        await sink(data)
        return content_type

    def saturated(self) -> bool:
        return False

    async def aclose(self) -> None:
        return None
