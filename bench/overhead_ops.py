"""The operations ``overhead.py`` compares: sync and submit+poll, direct and via the proxy.

Direct is the WaveSpeed simulator's own API (its sync mode; submit + ``/result``); via
the proxy, ``POST /v1/predictions`` (sync mode, or submit + ``GET /v1/predictions/{id}``).
An operation returns the latencies it saw, by series: ``e2e`` (submit until the client
sees the terminal state), and for submit+poll ``post`` and ``get`` (each call).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench.harness.load import BenchError, close_clients, json_object, open_clients, poll_until
from bench.harness.proxy import bearer
from bench.harness.simulators import SIM_KEY

SIM_SUBMIT = "/api/v3/wavespeed-ai/flux-dev"
SIM_RESULT = "/api/v3/predictions/{id}/result"
PROXY_SUBMIT = "/v1/predictions"
PROXY_GET = "/v1/predictions/{id}"
BODY: dict[str, Any] = {
    "prompt": "a lighthouse at dusk, oil painting",
    "size": "1024*1024",
    "num_inference_steps": 28,
    "guidance_scale": 3.5,
    "num_images": 1,
    "seed": 1234,
    "output_format": "jpeg",
}
PROXY_TERMINAL = frozenset({"completed", "failed", "canceled"})
SIM_TERMINAL = frozenset({"completed", "failed", "cancelled", "canceled", "timeout", "deleted"})
# The table's rows per mode: (row label, series key).
SERIES = {"sync": [("sync", "e2e")],
          "poll": [("poll e2e", "e2e"), ("poll POST", "post"), ("poll GET", "get")]}

Samples = dict[str, list[float]]
Op = Callable[[httpx.AsyncClient, int], Awaitable[Samples]]


def _why(error: object) -> str:
    """The start of a failed prediction's error text, to tell failures apart."""
    return f": {str(error)[:90]}" if error else ""


def _sim_data(body: dict[str, Any]) -> dict[str, Any]:
    data = body.get("data")
    if body.get("code") != 200 or not isinstance(data, dict):
        raise BenchError(f"envelope code {body.get('code')}")
    return data


class Target:
    """One side of the comparison (``direct`` or ``proxy``): its clients and operations."""

    def __init__(self, name: str, base_url: str, poll_interval_s: float) -> None:
        self.name = name
        self.base_url = base_url
        self.poll_interval_s = poll_interval_s
        self.bearer: str | None = SIM_KEY if name == "direct" else None
        self.clients: list[httpx.AsyncClient] = []

    def open(self, workers: int, op_timeout_s: float) -> None:
        """One client with one connection per worker."""
        self.clients += open_clients(self.base_url, workers - len(self.clients),
                                     op_timeout_s, bearer(self.bearer))

    async def close(self) -> None:
        clients, self.clients = self.clients, []
        await close_clients(clients)

    def op(self, mode: str) -> Op:
        table: dict[tuple[bool, str], Op] = {
            (True, "sync"): self._direct_sync,
            (True, "poll"): self._direct_poll,
            (False, "sync"): self._proxy_sync,
            (False, "poll"): self._proxy_poll,
        }
        return table[(self.name == "direct", mode)]

    # -- direct: the simulator's own WaveSpeed API

    async def _direct_sync(self, client: httpx.AsyncClient, _i: int = 0) -> Samples:
        t0 = time.perf_counter()
        r = await client.post(SIM_SUBMIT, json=BODY | {"enable_sync_mode": True})
        elapsed = time.perf_counter() - t0
        data = _sim_data(json_object(r, 200))
        if data.get("status") != "completed":
            raise BenchError(f"sync status {data.get('status')}")
        return {"e2e": [elapsed]}

    async def _direct_poll(self, client: httpx.AsyncClient, _i: int = 0) -> Samples:
        t0 = time.perf_counter()
        r = await client.post(SIM_SUBMIT, json=BODY)
        posted = time.perf_counter()
        job_id = _sim_data(json_object(r, 200)).get("id")
        if not isinstance(job_id, str):
            raise BenchError("no id")
        gets = await self._poll(client, SIM_RESULT.format(id=job_id), direct=True)
        return {"e2e": [time.perf_counter() - t0], "post": [posted - t0], "get": gets}

    # -- via the proxy

    async def _proxy_sync(self, client: httpx.AsyncClient, _i: int = 0) -> Samples:
        t0 = time.perf_counter()
        r = await client.post(PROXY_SUBMIT, json=BODY | {"enable_sync_mode": True})
        elapsed = time.perf_counter() - t0
        body = json_object(r, (200, 202))
        if r.status_code != 200 or body.get("status") != "completed":
            raise BenchError(f"sync answer {r.status_code} {body.get('status')}"
                             + _why(body.get("error")))
        return {"e2e": [elapsed]}

    async def _proxy_poll(self, client: httpx.AsyncClient, _i: int = 0) -> Samples:
        t0 = time.perf_counter()
        r = await client.post(PROXY_SUBMIT, json=BODY)
        posted = time.perf_counter()
        pred_id = json_object(r, 202).get("id")
        if not isinstance(pred_id, str):
            raise BenchError("no id")
        gets = await self._poll(client, PROXY_GET.format(id=pred_id), direct=False)
        return {"e2e": [time.perf_counter() - t0], "post": [posted - t0], "get": gets}

    async def _poll(self, client: httpx.AsyncClient, path: str, *, direct: bool
                    ) -> list[float]:
        """GET every poll_interval_s until terminal; the latency of each GET."""
        data, gets = await poll_until(client, path, self.poll_interval_s,
                                      SIM_TERMINAL if direct else PROXY_TERMINAL,
                                      unwrap=_sim_data if direct else None)
        if data.get("status") != "completed":
            raise BenchError(f"ended {data.get('status')}" + _why(data.get("error")))
        return gets
