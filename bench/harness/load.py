"""Load over HTTP: clients, the closed-loop generator, JSON answers, polling until done."""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

from bench.harness.procs import loopback

T = TypeVar("T")
MAX_POLLS = 100_000  # per operation; its time limit ends it long before in practice


class BenchError(Exception):
    """One operation did not end as it should (wrong status, bad body, not terminal)."""


def error_kind(exc: BaseException) -> str:
    """A short name for what went wrong, to count failures by kind."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(sorted({error_kind(e) for e in exc.exceptions}))
    if isinstance(exc, TimeoutError):
        return "op timeout"
    if isinstance(exc, BenchError):
        return str(exc)[:120]
    return type(exc).__name__


def json_object(response: httpx.Response, expect: int | Collection[int], *,
                show_body: bool = False) -> dict[str, Any]:
    """The JSON object of an answer with an expected status; BenchError otherwise
    (``show_body``: with the start of the body in the message)."""
    if response.status_code not in ((expect,) if isinstance(expect, int) else expect):
        detail = f": {response.text[:200]}" if show_body else ""
        raise BenchError(f"HTTP {response.status_code}{detail}")
    try:
        body = response.json()
    except ValueError:
        raise BenchError("body is not JSON") from None
    if not isinstance(body, dict):
        raise BenchError("body is not a JSON object")
    return body


async def poll_until(
    client: httpx.AsyncClient,
    path: str,
    interval_s: float,
    terminal: Collection[str],
    *,
    unwrap: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    show_body: bool = False,
) -> tuple[dict[str, Any], list[float]]:
    """GET ``path`` every ``interval_s`` until its ``status`` is terminal: the last answer
    (through ``unwrap``, e.g. an envelope's ``data``) and the latency of each GET."""
    gets: list[float] = []
    for _ in range(MAX_POLLS):
        await asyncio.sleep(interval_s)
        t = time.perf_counter()
        r = await client.get(path)
        gets.append(time.perf_counter() - t)
        data = json_object(r, 200, show_body=show_body)
        if unwrap is not None:
            data = unwrap(data)
        if data.get("status") in terminal:
            return data, gets
    raise BenchError("never terminal")


def open_clients(base_url: str, n: int, timeout_s: float,
                 headers: Mapping[str, str] | None = None) -> list[httpx.AsyncClient]:
    """``n`` clients of one connection each. A single shared client with a pool of 200
    costs ~10 ms of CPU per request here (httpcore scans its whole pool on every request
    and release), which would swamp what we measure."""
    loopback(base_url)
    # Plain http on loopback; one shared TLS context all the same, because httpx builds
    # (and loads CA certificates into) one per client otherwise: ~30 ms each.
    tls = ssl.create_default_context()
    return [httpx.AsyncClient(
        base_url=base_url, headers=dict(headers or {}), verify=tls, trust_env=False,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    ) for _ in range(n)]


async def close_clients(clients: Sequence[httpx.AsyncClient]) -> None:
    for client in clients:
        await client.aclose()


@dataclass
class LoadResult(Generic[T]):
    """What the measured operations returned, the failures by kind, the window."""

    results: list[T] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    truncated: bool = False  # the time limit stopped it before all were issued

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())


async def closed_loop(
    op: Callable[[httpx.AsyncClient, int], Awaitable[T]],
    clients: Sequence[httpx.AsyncClient],
    n: int,
    *,
    window_s: float,
    op_timeout_s: float | None = None,
    ramp_s: float = 0.0,
    warmup: int = 0,
    on_measure: Callable[[], None] | None = None,
) -> LoadResult[T]:
    """``warmup`` then ``n`` operations over closed-loop workers (one per client); ``op``
    gets a client and the operation's index (0 = the first issued).

    Warm-up and measurement are one continuous run, so the workers keep their phases:
    the first ``warmup`` operations are not recorded, and the window (wall time, and
    ``on_measure``, called once, for CPU counters) starts when the first recorded one is
    issued. ``ramp_s``: worker i starts i/len(clients) * ramp_s late, so that long jobs
    do not arrive in synchronized waves. Bounded by ``window_s`` (no operation starts
    after it) and ``op_timeout_s`` per operation. BenchError, a timeout and httpx errors
    count as failures; anything else ends the run.
    """
    out: LoadResult[T] = LoadResult()
    kinds: collections.Counter[str] = collections.Counter()
    total = warmup + n
    issued = 0
    start = time.perf_counter()
    stop_at = time.monotonic() + window_s

    def begin() -> None:
        nonlocal start
        start = time.perf_counter()
        if on_measure is not None:
            on_measure()

    if warmup == 0:
        begin()

    async def worker(index: int, client: httpx.AsyncClient) -> None:
        nonlocal issued
        if ramp_s > 0:
            await asyncio.sleep(ramp_s * index / len(clients))
        while issued < total and time.monotonic() < stop_at:
            i = issued
            issued += 1
            recorded = i >= warmup
            if recorded and i == warmup and warmup:
                begin()
            try:
                got = await asyncio.wait_for(op(client, i), timeout=op_timeout_s)
            except (BenchError, TimeoutError, httpx.HTTPError) as exc:
                if recorded:
                    kinds[error_kind(exc)] += 1
            else:
                if recorded:
                    out.results.append(got)

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients)))
    out.wall_s = time.perf_counter() - start
    out.error_kinds, out.truncated = dict(kinds), issued < total
    return out
