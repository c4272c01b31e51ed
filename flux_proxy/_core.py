"""What the sync and async clients share: settings, the retry policy, the poll
schedule and reading answers. Only the I/O differs between _sync.py and _async.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from flux_proxy._errors import ConnectError, FluxProxyError, error_from_response

URL_VARIABLE = "FLUX_PROXY_URL"
KEY_VARIABLE = "FLUX_PROXY_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8080"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# How long a sync-mode POST may take to answer: the proxy waits up to its
# sync_timeout_s (120 s by default) and then answers 202 with the running prediction.
SYNC_READ_TIMEOUT_S = 150.0

_backoff = wait_exponential(multiplier=0.25, max=4.0) + wait_random(0, 0.25)


@dataclass(frozen=True, slots=True)
class Config:
    base_url: str
    api_key: str | None
    timeout: float
    max_retries: int  # retries after the first try
    retry_timeout: float  # the most seconds a call spends retrying, waits included
    poll_interval: float
    poll_max_interval: float

    @classmethod
    def make(cls, base_url: str | None, api_key: str | None, **options: Any) -> Config:
        base = (base_url or os.environ.get(URL_VARIABLE) or DEFAULT_URL).rstrip("/")
        if not base.lower().startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, not {base!r}")
        key = api_key if api_key is not None else os.environ.get(KEY_VARIABLE) or None
        return cls(base_url=base, api_key=key, **options)

    @property
    def headers(self) -> dict[str, str]:
        out = {"User-Agent": "flux-proxy-client"}
        if self.api_key:
            out["Authorization"] = f"Bearer {self.api_key}"
        return out

    def url(self, path: str) -> str:
        return path if "://" in path else f"{self.base_url}{path}"

    def retrying(self) -> dict[str, Any]:
        """tenacity arguments: retry what may succeed next time (no connection, 429,
        502/503/504, an Idempotency-Key still being admitted), bounded in count and in
        time; a Retry-After the time left cannot cover is not waited for."""
        return {
            "stop": stop_after_attempt(self.max_retries + 1)
            | stop_before_delay(self.retry_timeout),
            "wait": _wait,
            "retry": retry_if_exception(_retryable),
            "reraise": True,
        }


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, FluxProxyError) and bool(exc.retryable)


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    after = getattr(exc, "retry_after", None)
    if isinstance(after, int | float):
        return float(after)
    return float(_backoff(state))


def new_idempotency_key() -> str:
    """One per submit, the same on each of its retries: a retry never makes a second
    prediction (the proxy answers a repeat with the first one)."""
    return str(uuid.uuid4())


def transport_error(exc: httpx.TransportError, base_url: str) -> ConnectError:
    return ConnectError(f"cannot reach the proxy at {base_url}: {type(exc).__name__}: {exc}")


def read(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; the typed exception for anything else."""
    if not 200 <= response.status_code < 300:
        raise error_from_response(response)
    try:
        return response.json()
    except ValueError as exc:
        raise FluxProxyError(f"the proxy answered {response.status_code} with a body that "
                             "is not JSON", status=response.status_code,
                             body=response.text[:1000]) from exc


def poll_delays(first: float, most: float) -> Iterator[float]:
    """Seconds between polls: `first`, doubling up to `most` (the caller's deadline
    ends the loop)."""
    delay = first
    while True:
        yield delay
        delay = min(most, delay * 2)


def prediction_id(value: Any) -> str:
    pred_id = getattr(value, "id", value)
    if not isinstance(pred_id, str) or not pred_id:
        raise TypeError(f"expected a prediction or its id, not {value!r}")
    return pred_id


def list_params(status: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if cursor:
        params["cursor"] = cursor
    return params


def spend_params(group_by: str, since: Any, until: Any) -> dict[str, str]:
    params = {"group_by": group_by, "format": "json"}
    for name, value in (("from", since), ("to", until)):
        if value is not None:
            params[name] = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return params
