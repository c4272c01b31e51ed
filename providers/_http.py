"""HTTP plumbing shared by the provider adapters.

One pooled `httpx.AsyncClient` per provider, and one function, `call`, that
performs a request and maps every way it can fail onto the error taxonomy in
`providers.base`. The rules that matter:

* Nothing sent (connect error, connect/pool timeout): `UpstreamUnavailable`.
* A submit (POST, not idempotent) that was sent but got no answer (read
  timeout, dropped connection, write error mid-body): `OutcomeUnknown` -- the
  task may exist upstream and must never be submitted again. The same failure
  on a poll (GET, idempotent) is an ordinary `UpstreamTimeout` /
  `UpstreamUnavailable` and the caller's poll loop retries it.
* Nothing here retries. A submit is never retried (a task may exist); a poll
  does one GET and the caller owns the backoff.

Messages are safe to show clients: provider, operation, status and a short
reason. Never the API key, never an upstream body beyond `REASON_MAX` chars.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any, Literal, NoReturn, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from common import media

from ._assets import download, download_to
from ._pool import lean_pool
from ._text import REASON_MAX, safe_text
from ._urls import URLCache
from .base import (
    AuthFailed,
    BaseProvider,
    InvalidInput,
    MalformedResponse,
    OutcomeUnknown,
    ProviderSettings,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)

M = TypeVar("M", bound=BaseModel)

# submit: a POST that may create a task. poll: a GET of a task's state.
Call = Literal["submit", "poll"]

RETRY_AFTER_MAX = 3600.0  # a Retry-After beyond an hour is taken as an hour

# Failure texts that mean "refused by content moderation" (policy: no failover).
_POLICY_TEXT = re.compile(r"moderat|flagged|nsfw|safety|unsafe|content policy", re.IGNORECASE)


def looks_like_policy_refusal(text: str | None) -> bool:
    return bool(text) and _POLICY_TEXT.search(text or "") is not None


# --------------------------------------------------------------------------- clients


def timeout(settings: ProviderSettings, *, read_s: float | None = None) -> httpx.Timeout:
    read = read_s if read_s is not None else settings.read_timeout_s
    return httpx.Timeout(
        connect=settings.connect_timeout_s,
        read=read,
        write=settings.read_timeout_s,
        pool=settings.connect_timeout_s,
    )


def submit_timeout(settings: ProviderSettings, answer_s: float | None = None) -> httpx.Timeout:
    """The timeouts of a submit whose answer must come within `answer_s` of sending
    (default `submit_timeout_s`): no single read may wait longer than that either
    (this holds on transports that do not report when the request was sent)."""
    answer = settings.submit_timeout_s if answer_s is None else answer_s
    return timeout(settings, read_s=min(settings.read_timeout_s, answer))


def build_client(
    settings: ProviderSettings, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The API client: pooled, authenticated, pinned to `base_url`, no redirects
    (a redirect would carry the Bearer key wherever the upstream points)."""
    headers = {"Accept": "application/json", "User-Agent": "flux-proxy"}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
        keepalive_expiry=settings.keepalive_expiry_s,
    )
    return lean_pool(httpx.AsyncClient(
        base_url=settings.base_url,
        headers=headers,
        timeout=timeout(settings),
        limits=limits,
        follow_redirects=False,
        transport=transport,
    ), settings)


def build_asset_client(
    settings: ProviderSettings, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The output-download client: no Authorization header, ever (asset hosts
    are CDNs and buckets; our key has no business there)."""
    limits = httpx.Limits(max_connections=settings.max_connections,
                          keepalive_expiry=settings.keepalive_expiry_s)
    return lean_pool(httpx.AsyncClient(
        headers={"User-Agent": "flux-proxy"},
        timeout=httpx.Timeout(settings.download_timeout_s, connect=settings.connect_timeout_s),
        limits=limits,
        follow_redirects=False,
        transport=transport,
    ), settings)


# --------------------------------------------------------------------------- the call


async def call(
    client: httpx.AsyncClient,
    method: str,
    url: str | httpx.URL,
    *,
    urls: URLCache | None = None,
    provider: str,
    op: Call,
    secret: str | None = None,
    json_body: Mapping[str, Any] | None = None,
    http_timeout: httpx.Timeout | None = None,
    total_s: float | None = None,
    answer_s: float | None = None,
) -> dict[str, Any]:
    """Perform one request; return the JSON object of a 2xx answer or raise a
    `ProviderError`. `secret` is scrubbed from any reason quoted upstream.
    `total_s` bounds the whole call, body included. `answer_s` bounds the wait for
    the answer (headers and body) once the request has been sent, however the
    bytes come: the clock starts when the request body is written, so a slow
    upload of a large request does not count against it. `urls` parses `url`
    (a string) once for all calls; its errors are mapped like httpx's own."""
    extra: dict[str, Any] = {} if http_timeout is None else {"timeout": http_timeout}
    answer_bound = False
    try:
        async with asyncio.timeout(total_s) as bound:
            if answer_s is not None:
                loop = asyncio.get_running_loop()

                async def trace(event: str, info: Mapping[str, Any]) -> None:
                    # httpcore's "http11.send_request_body.complete" (or http2's):
                    # the request is out, from here on we only wait for the answer.
                    nonlocal answer_bound
                    if event.endswith("send_request_body.complete") and not answer_bound:
                        when = loop.time() + answer_s
                        current = bound.when()
                        if current is None or when < current:
                            bound.reschedule(when)
                            answer_bound = True

                extra["extensions"] = {"trace": trace}
            target = urls.get(url) if urls is not None and isinstance(url, str) else url
            response = await client.request(method, target, json=json_body, **extra)
    except TimeoutError as exc:  # a bound of ours: the request went out
        limit = f"{answer_s}s of sending" if answer_bound else f"{total_s}s"
        if op == "submit":
            raise _unknown(provider, f"no complete answer within {limit}") from exc
        raise UpstreamTimeout(f"{provider}: {op} took longer than {limit}",
                              provider=provider) from exc
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise UpstreamUnavailable(
            f"{provider}: {op} could not connect ({type(exc).__name__})", provider=provider
        ) from exc
    except httpx.TimeoutException as exc:  # read or write timeout: the request went out
        if op == "submit":
            raise _unknown(provider, f"no answer in time ({type(exc).__name__})") from exc
        raise UpstreamTimeout(
            f"{provider}: {op} timed out ({type(exc).__name__})", provider=provider
        ) from exc
    except httpx.DecodingError as exc:  # an answer came, but its encoding is broken
        if op == "submit":
            raise _unknown(provider, f"its answer was unreadable ({type(exc).__name__})") from exc
        raise MalformedResponse(
            f"{provider}: {op} answer could not be decoded", provider=provider
        ) from exc
    except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:  # read/write error, drop
        if op == "submit":
            raise _unknown(provider, f"connection lost ({type(exc).__name__})") from exc
        raise UpstreamUnavailable(
            f"{provider}: {op} connection lost ({type(exc).__name__})", provider=provider
        ) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # local errors: nothing was sent
        raise UpstreamUnavailable(
            f"{provider}: {op} failed ({type(exc).__name__})", provider=provider
        ) from exc

    if not response.is_success:
        raise_for_status(
            provider,
            op,
            response.status_code,
            _reason(response, secret),
            headers=response.headers,
        )
    return parse_object(provider, op, response.content, status_code=response.status_code)


def _unknown(provider: str, why: str) -> OutcomeUnknown:
    return OutcomeUnknown(
        f"{provider}: submit sent but {why}; the task may exist upstream", provider=provider
    )


def _unknown_or_malformed(op: Call) -> type[OutcomeUnknown] | type[MalformedResponse]:
    return OutcomeUnknown if op == "submit" else MalformedResponse


def parse_object(
    provider: str, op: Call, content: bytes, *, status_code: int | None = None
) -> dict[str, Any]:
    # A garbled 2xx answer to a submit may still mean the task was created.
    error = _unknown_or_malformed(op)
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise error(
            f"{provider}: {op} answered with a body that is not JSON",
            provider=provider,
            status_code=status_code,
        ) from None
    if not isinstance(body, dict):
        raise error(
            f"{provider}: {op} answered with JSON that is not an object",
            provider=provider,
            status_code=status_code,
        )
    return body


def parse_model(provider: str, op: Call, model: type[M], data: Mapping[str, Any]) -> M:
    """Validate a wire shape; name only the offending field, never its value."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"]) or "body"
        raise _unknown_or_malformed(op)(
            f"{provider}: {op} answer has an unexpected shape at {where!r}", provider=provider
        ) from None


# --------------------------------------------------------------------------- error mapping


def raise_for_status(
    provider: str,
    op: Call,
    status: int,
    reason: str,
    *,
    headers: Mapping[str, str] | None = None,
    upstream_code: int | None = None,
) -> NoReturn:
    """Map an HTTP status (or an envelope code used like one) onto the taxonomy."""
    label = f"{provider}: {op} got {status}" + (f": {reason}" if reason else "")
    kw: dict[str, Any] = {
        "provider": provider,
        "status_code": status,
        "upstream_code": upstream_code,
    }
    if status == 429:
        retry_after = parse_retry_after((headers or {}).get("retry-after"))
        raise RateLimited(label, retry_after=retry_after, **kw)
    if status in (401, 403):
        raise AuthFailed(label, **kw)
    if status == 404:
        # poll: the job is gone; submit: our base_url or model path is wrong. Either
        # way another provider may serve the request, so it is not the client's fault.
        what = "job not found" if op == "poll" else "endpoint not found (check base_url)"
        raise UpstreamUnavailable(f"{provider}: {op} got 404: {what}", **kw)
    if status in (400, 413, 422):
        raise InvalidInput(label, **kw)
    if status == 408:  # the upstream gave up waiting for our request: nothing accepted
        raise UpstreamTimeout(label, **kw)
    if status == 504 and op == "submit":
        # A gateway gave up waiting on a backend that had our request (always
        # so in WaveSpeed's sync mode): the task goes on upstream, without an id.
        raise OutcomeUnknown(f"{label}; the task may exist upstream", **kw)
    if 300 <= status < 400:
        raise UpstreamUnavailable(f"{provider}: {op} got an unexpected redirect ({status})", **kw)
    raise UpstreamUnavailable(label, **kw)  # 5xx and anything unforeseen: retryable


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (RFC 9110: delay-seconds or an HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX)


def _reason(response: httpx.Response, secret: str | None) -> str:
    """A short, client-safe reason from an error body: its `message` / `error` /
    `detail` string when it is JSON, else the first bytes of its text."""
    text = ""
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):  # {"error": {"message": ...}}
            body = body["error"]
        for key in ("message", "error", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                text = body[key]
                break
    elif body is None and not response.content.lstrip().startswith(b"<"):  # skip HTML pages
        text = response.content[: REASON_MAX * 2].decode("utf-8", "replace")
    return safe_text(text, secret) or response.reason_phrase


class HTTPProvider(BaseProvider):
    """What every HTTP upstream adapter shares: one pooled API client carrying the
    key, a separate key-less client for output downloads, and the output guard."""

    def __init__(
        self,
        name: str,
        settings: ProviderSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        guard: media.OutboundGuard | None = None,
    ) -> None:
        """`transport` replaces the HTTP transport (tests). `guard` vets output
        downloads; by default public addresses only, unless the settings'
        allow_private_asset_hosts."""
        self.name = name
        self._secret = settings.api_key.get_secret_value() if settings.api_key else None
        self._client = build_client(settings, transport=transport)
        self._urls = URLCache(self._client.base_url)
        self._assets = build_asset_client(settings, transport=transport)
        self._guard = guard or media.OutboundGuard(allow_private=settings.allow_private_asset_hosts)
        self._download_settings = settings

    async def download(self, url: str) -> tuple[bytes, str | None]:
        return await download(self.name, self._assets, url, self._download_settings,
                              self._guard)

    async def download_to(self, url: str, sink: media.Sink) -> str | None:
        return await download_to(self.name, self._assets, url, sink,
                                 self._download_settings, self._guard)

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._assets.aclose()
