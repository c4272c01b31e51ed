"""AsyncFluxProxy: the asyncio client (the same calls as FluxProxy, awaited)."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from tenacity import AsyncRetrying

from flux_proxy import _core
from flux_proxy._core import Config, read
from flux_proxy._errors import WaitTimeout, error_from_response
from flux_proxy._inputs import ImageInput, request_body
from flux_proxy._outputs import auth_headers, checked, save_standalone, save_with_async
from flux_proxy._types import Model, Page, Prediction, Spend


class AsyncFluxProxy:
    """An asyncio client of a running flux-proxy; see FluxProxy.

    `base_url` defaults to FLUX_PROXY_URL (else http://127.0.0.1:8080), `api_key` to
    FLUX_PROXY_API_KEY. Calls are retried on no connection, 429 (after Retry-After),
    502/503/504, at most `max_retries` times within `retry_timeout` seconds; every
    submit carries an Idempotency-Key, so a retried submit never makes a second
    prediction. `transport` is httpx's seam (tests, proxies, custom TLS).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 30.0, max_retries: int = 3, retry_timeout: float = 60.0,
                 poll_interval: float = 0.25, poll_max_interval: float = 2.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if poll_interval <= 0 or poll_max_interval < poll_interval:
            raise ValueError("need 0 < poll_interval <= poll_max_interval")
        self._config = Config.make(base_url, api_key, timeout=timeout,
                                   max_retries=max_retries, retry_timeout=retry_timeout,
                                   poll_interval=poll_interval,
                                   poll_max_interval=poll_max_interval)
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    # ------------------------------------------------------------------ plumbing

    async def _once(self, method: str, url: str, headers: dict[str, str],
                    **kw: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, url, headers=headers, **kw)
        except httpx.TransportError as exc:
            raise _core.transport_error(exc, self.base_url) from exc
        if not 200 <= response.status_code < 300:
            raise error_from_response(response)
        return response

    async def _send(self, method: str, path: str, *, headers: dict[str, str] | None = None,
              **kw: Any) -> httpx.Response:
        all_headers = self._config.headers | (headers or {})
        return await AsyncRetrying(**self._config.retrying())(
            self._once, method, self._config.url(path), all_headers, **kw)

    def _prediction(self, body: Any) -> Prediction:
        return Prediction.from_json(body, saver=self._save_blocking)

    def _save_blocking(self, prediction: Prediction, directory: Path) -> builtins.list[Path]:
        # Prediction.save() is synchronous; `await client.save(prediction, dir)` is not.
        return save_standalone(prediction, directory, base_url=self.base_url,
                               api_key=self._config.api_key, timeout=self._config.timeout)

    # ------------------------------------------------------------------ predictions

    async def submit(self, prompt: str, *, size: str | None = None, num_images: int | None = None,
               seed: int | None = None, image: ImageInput | None = None,
               mask: ImageInput | None = None, providers: builtins.list[str] | None = None,
               idempotency_key: str | None = None, **extra: Any) -> Prediction:
        """Create a prediction (202: queued). `extra`: any other request field
        (num_inference_steps, guidance_scale, output_format, enable_base64_output, ...)."""
        body = request_body(prompt, size=size, num_images=num_images, seed=seed, image=image,
                            mask=mask, providers=providers, extra=extra)
        return await self._submit(body, idempotency_key)

    async def _submit(self, body: dict[str, Any], idempotency_key: str | None,
                read_timeout: float | None = None) -> Prediction:
        key = idempotency_key or _core.new_idempotency_key()  # the same on every retry
        timeout = httpx.Timeout(self._config.timeout, read=read_timeout or self._config.timeout)
        response = await self._send("POST", "/v1/predictions", json=body, timeout=timeout,
                              headers={_core.IDEMPOTENCY_HEADER: key})
        return self._prediction(read(response))

    async def generate(self, prompt: str, *, size: str | None = None,
                 num_images: int | None = None, seed: int | None = None,
                 image: ImageInput | None = None, mask: ImageInput | None = None,
                 providers: builtins.list[str] | None = None,
                 timeout: float = 600.0,  # noqa: ASYNC109 (FluxProxy's signature)
                 idempotency_key: str | None = None,
                 on_update: Callable[[Prediction], None] | None = None,
                 **extra: Any) -> Prediction:
        """Create a prediction and wait for it: the proxy's sync mode, then polling if
        it is still running when the proxy answers. Returns the completed prediction;
        raises PredictionFailed (PolicyRefused, BudgetExceeded) if it did not complete,
        WaitTimeout after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        body = request_body(prompt, size=size, num_images=num_images, seed=seed, image=image,
                            mask=mask, providers=providers,
                            extra={"enable_sync_mode": True, **extra})
        pred = await self._submit(body, idempotency_key,
                            read_timeout=min(_core.SYNC_READ_TIMEOUT_S, max(timeout, 1.0)))
        if not pred.done:
            pred = await self.wait(pred, timeout=max(0.0, deadline - time.monotonic()),
                             on_update=on_update)
        return pred.raise_for_status()

    async def get(self, prediction: Prediction | str) -> Prediction:
        pred_id = _core.prediction_id(prediction)
        return self._prediction(read(await self._send("GET", f"/v1/predictions/{pred_id}")))

    async def wait(self, prediction: Prediction | str, *,
                   timeout: float = 600.0,  # noqa: ASYNC109 (FluxProxy's signature)
             on_update: Callable[[Prediction], None] | None = None) -> Prediction:
        """Poll until the prediction is terminal (whatever its status) and return it;
        WaitTimeout (carrying the last state) after `timeout` seconds."""
        pred_id = _core.prediction_id(prediction)
        deadline = time.monotonic() + timeout
        pred = prediction if isinstance(prediction, Prediction) else await self.get(pred_id)
        for delay in _core.poll_delays(self._config.poll_interval,
                                       self._config.poll_max_interval):
            if on_update is not None:
                on_update(pred)
            if pred.done:
                return pred
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"prediction {pred_id} is still {pred.status} after "
                                  f"{timeout:g} s", code="wait_timeout", prediction=pred)
            await asyncio.sleep(min(delay, left))
            pred = await self.get(pred_id)
        raise AssertionError("unreachable")  # poll_delays never ends

    async def cancel(self, prediction: Prediction | str) -> Prediction:
        """Ask the proxy to cancel; Conflict (409) if it already ended."""
        pred_id = _core.prediction_id(prediction)
        return self._prediction(read(await self._send("POST", f"/v1/predictions/{pred_id}/cancel")))

    async def pages(self, *, status: str | None = None, limit: int = 20,
              cursor: str | None = None) -> AsyncIterator[Page]:
        """Pages of GET /v1/predictions, newest first, following `next_cursor`."""
        seen: set[str] = set()
        while True:
            body = read(await self._send("GET", "/v1/predictions",
                                   params=_core.list_params(status, limit, cursor)))
            page = Page([self._prediction(p) for p in body.get("data") or []],
                        body.get("next_cursor"))
            yield page
            if not page.next_cursor or page.next_cursor in seen:  # never loop on a cursor
                return
            cursor = page.next_cursor
            seen.add(cursor)

    async def list(self, *, status: str | None = None,
                   limit: int = 20) -> AsyncIterator[Prediction]:
        """Every prediction this key sees, newest first, fetched a page (`limit`) at a time."""
        async for page in self.pages(status=status, limit=limit):
            for pred in page.data:
                yield pred

    # ------------------------------------------------------------------ the rest

    async def spend(self, *, group_by: str = "provider", since: Any = None,
              until: Any = None) -> Spend:
        """GET /v1/spend (`since` inclusive, `until` exclusive: dates or ISO strings)."""
        params = _core.spend_params(group_by, since, until)
        return Spend.from_json(read(await self._send("GET", "/v1/spend", params=params)))

    async def models(self) -> builtins.list[Model]:
        return [Model.from_json(m) for m in read(await self._send("GET", "/v1/models"))["data"]]

    async def save(self, prediction: Prediction,
                   directory: str | Path = ".") -> builtins.list[Path]:
        """Write the outputs to `directory` as `<id>-<n>.<ext>`; the paths written."""
        async def fetch(url: str) -> tuple[str | None, bytes]:
            headers = {"User-Agent": "flux-proxy-client",
                       **auth_headers(url, self.base_url, self._config.api_key)}
            return checked(await AsyncRetrying(**self._config.retrying())(
                self._once, "GET", url, headers, follow_redirects=True))

        return await save_with_async(prediction, Path(directory), fetch)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncFluxProxy:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        await self.aclose()
