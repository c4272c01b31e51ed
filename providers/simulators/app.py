"""The simulator as an ASGI app: routes, fault injection, jobs over a `Wire`.

Routes (besides the wire's own submit and poll):
`GET /assets/{job}/{index}.{ext}` the images (no auth, like a CDN);
`GET /_sim/stats`, `GET|POST /_sim/config`, `POST /_sim/reset`, `GET /_sim/health`,
`GET /_sim/billing` (every accepted task and its charge: `billing.py`).
The knobs are documented in `config.py`.

Order of a submit: submit latency, auth (401), body (400), then faults: hang, drop,
429 (directive, `rate_limit`, `max_rps`), 5xx (directive, `error_rate`), malformed;
then validation (400), then the job is accepted (and billed) and its fate (moderation,
failure after accept, NSFW flags) is fixed from the knobs at that moment; then, with
`drop_after_accept`, the connection is closed without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Literal

import msgspec

from .asgi import (
    BodyTooLarge,
    Receive,
    Scope,
    Send,
    drop_connection,
    header,
    read_body,
    respond,
    respond_json,
    wait,
)
from .billing import BillingLog
from .config import Directives, SimConfig, parse_directives
from .faults import Faults, retry_after
from .images import CONTENT_TYPES, render_image
from .jobs import Job, JobSpec, JobStore, Stats
from .vibedream import VibeDreamWire
from .wavespeed import WaveSpeedWire
from .wire import Wire, WireError

Kind = Literal["vibedream", "wavespeed"]
WIRES: dict[str, type[Wire]] = {"vibedream": VibeDreamWire, "wavespeed": WaveSpeedWire}

_REASONS = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    429: "Too many requests, please slow down",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}
_MALFORMED_TEXT = b"<html><body><h1>502 Bad Gateway</h1><p>upstream hiccup</p></body></html>"
_GATEWAY_TIMEOUT = b"<html><body><h1>504 Gateway Time-out</h1></body></html>"
_HTML = b"text/html; charset=utf-8"


class SimulatorApp:
    """ASGI app simulating one upstream. `config` is live: mutate it to change knobs."""

    def __init__(
        self, kind: Kind, config: SimConfig | None = None, *, public_base_url: str | None = None
    ) -> None:
        if kind not in WIRES:
            raise ValueError(f"unknown simulator kind {kind!r}; expected one of {sorted(WIRES)}")
        self.kind = kind
        self.wire: Wire = WIRES[kind]()
        self.config = config if config is not None else SimConfig()
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self._initial = self.config.copy()
        self.stats = Stats()
        self.jobs = JobStore(self.config.max_jobs)
        self.billing = BillingLog(self.config.max_jobs)
        self.faults = Faults(self.config)
        self._closing: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    def reset(self, *, keep_config: bool = False) -> None:
        """Forget jobs and counters, re-seed the RNG; restore the creation config."""
        if not keep_config:
            self.config.assign(self._initial.copy())
        self.jobs.clear()
        self.billing.clear()
        self.stats = Stats()
        self.faults.reseed()

    def close(self) -> None:
        """Release every request held by a hang or a sync wait (thread-safe)."""
        loop, event = self._loop, self._closing
        if loop is None or event is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(event.set)

    def _closing_event(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._closing is None or self._loop is not loop:
            # A new event loop is a new serving session.
            self._loop, self._closing = loop, asyncio.Event()
        return self._closing

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                await self._route(scope, receive, send)
            except BodyTooLarge:
                await respond_json(send, 413, self.wire.error_body(413, "Request too large"))
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        wire = self.wire
        if path == wire.submit_path:
            if method != "POST":
                return await self._error(send, 405, "Method not allowed")
            return await self._submit(scope, receive, send)
        job_id = wire.poll_id(path)
        if job_id is not None:
            if method != "GET":
                return await self._error(send, 405, "Method not allowed")
            return await self._poll(scope, receive, send, job_id)
        if path.startswith("/assets/"):
            if method not in ("GET", "HEAD"):
                return await respond(send, 405, b"Method Not Allowed", b"text/plain")
            return await self._asset(receive, send, path)
        if path.startswith("/_sim/"):
            return await self._control(receive, send, method, path)
        await self._error(send, 404, "Not found")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._closing_event()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------ submit

    async def _submit(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.submits += 1
        cfg, wire = self.config, self.wire
        raw = await read_body(receive)
        if raw is None:
            return
        body, directives, problem = _parse(raw)
        delay = directives.submit_latency_s
        if not await self._delay(receive, send, cfg.submit_latency_s if delay is None else delay):
            return
        if not await self._check_auth(scope, send):
            return
        if body is None or problem is not None:
            return await self._error(send, 400, problem or "Invalid request body")
        if await self._inject_submit_fault(receive, send, directives):
            return
        try:
            spec = wire.validate(body, cfg)
        except WireError as exc:
            return await self._error(send, 400, str(exc))
        job = self._accept(spec, directives)
        if directives.drop_after_accept or cfg.drop_after_accept:
            self.billing.unanswered(job.id)
            return await drop_connection(send, receive)
        base = self._base(scope)
        if spec.sync and wire.supports_sync:
            return await self._sync(receive, send, job, base)
        await respond_json(send, 200, wire.submit_body(job, base, cfg))

    async def _inject_submit_fault(self, receive: Receive, send: Send, d: Directives) -> bool:
        """Answer with the fault this submit draws, if any. True when answered."""
        cfg = self.config
        if d.hang or cfg.hang:
            seconds = d.hang_s if d.hang_s is not None else cfg.hang_s
            outcome = await wait(receive, seconds, self._closing_event())
            if outcome != "disconnect":
                await self._error(send, 503 if outcome == "closing" else 504, "Timed out")
            return True
        if d.drop or cfg.drop:
            await drop_connection(send, receive)
            return True
        status = self.faults.submit_status(d)
        if status is not None:
            await self._error(send, status, _REASONS.get(status, "Simulated error"))
            return True
        malformed = d.malformed or (cfg.malformed_body if cfg.malformed else None)
        if malformed:
            await self._malformed(send, malformed)
            return True
        return False

    def _accept(self, spec: JobSpec, d: Directives) -> Job:
        cfg = self.config
        latency = cfg.job_latency_s if d.latency_s is None else d.latency_s
        job = Job(
            id=self.wire.new_id(),
            spec=spec,
            seed=self.faults.seed(spec),
            created_at=time.time(),
            started=time.monotonic(),
            latency_s=max(0.0, latency),
            failure=self.faults.failure(d),
            nsfw=self.faults.nsfw(spec, d),
            poll_5xx_left=d.poll_5xx,
            poll_malformed_left=d.poll_malformed,
        )
        self.jobs.max_jobs = self.billing.max_entries = cfg.max_jobs
        self.jobs.add(job)
        self.billing.add(job, self.wire.price_micro_usd(spec, cfg), self.wire)
        self.stats.jobs += 1
        return job

    async def _sync(self, receive: Receive, send: Send, job: Job, base: str) -> None:
        """WaveSpeed `enable_sync_mode`: answer terminal, or give up past sync_give_up_s."""
        cfg = self.config
        remaining = job.remaining(time.monotonic())
        give_up = cfg.sync_give_up_s
        outcome = await wait(receive, min(remaining, give_up), self._closing_event())
        if outcome == "disconnect":
            self.billing.unanswered(job.id)  # the client left: it never saw the id
            return
        if outcome == "elapsed" and remaining <= give_up:
            return await respond_json(send, 200, self.wire.poll_body(job, base, job.done_at))
        if cfg.sync_timeout_mode == "504":
            return await respond(send, 504, _GATEWAY_TIMEOUT, _HTML)
        await respond_json(send, 200, self.wire.sync_give_up_body(job, base, time.monotonic()))

    # ------------------------------------------------------------------ poll

    async def _poll(self, scope: Scope, receive: Receive, send: Send, job_id: str) -> None:
        self.stats.polls += 1
        cfg = self.config
        if not await self._delay(receive, send, cfg.poll_latency_s):
            return
        if not await self._check_auth(scope, send):
            return
        job = self.jobs.get(job_id)
        if job is None:
            return await self._error(send, 404, "Prediction not found")
        status = self.faults.poll_status(job)
        if status is not None:
            return await self._error(send, status, _REASONS.get(status, "Simulated error"))
        if self.faults.poll_malformed(job):
            return await self._malformed(send, cfg.malformed_body)
        body = self.wire.poll_body(job, self._base(scope), time.monotonic())
        await respond_json(send, 200, body)

    # ------------------------------------------------------------------ assets

    async def _asset(self, receive: Receive, send: Send, path: str) -> None:
        self.stats.asset_gets += 1
        if not await self._delay(receive, send, self.config.asset_latency_s):
            return
        parts = path[len("/assets/") :].split("/")
        stem = parts[-1].split(".", 1)[0]
        job = self.jobs.get(parts[0]) if len(parts) == 2 and stem.isdigit() else None
        index = int(stem) if job is not None else -1
        if job is None or not job.succeeded(time.monotonic()) or index >= job.spec.num_images:
            return await respond(send, 404, b"Not Found", b"text/plain")
        spec = job.spec
        data = render_image(job.seed, index, spec.width, spec.height, spec.output_format)
        content_type = CONTENT_TYPES[spec.output_format].encode()
        cache = [(b"cache-control", b"public, max-age=86400")]
        await respond(send, 200, data, content_type, cache)

    # ------------------------------------------------------------------ control

    async def _control(self, receive: Receive, send: Send, method: str, path: str) -> None:
        if path == "/_sim/stats" and method == "GET":
            return await respond_json(send, 200, self.stats.as_dict())
        if path == "/_sim/billing" and method == "GET":
            body = self.billing.as_dict(self.wire, time.monotonic())
            return await respond_json(send, 200, body)
        if path == "/_sim/health" and method == "GET":
            return await respond_json(send, 200, {"ok": True, "kind": self.kind})
        if path == "/_sim/config" and method == "GET":
            return await respond_json(send, 200, self.config.as_dict())
        if path in ("/_sim/config", "/_sim/reset") and method == "POST":
            raw = await read_body(receive)
            try:
                changes = msgspec.json.decode(raw) if raw else {}
            except msgspec.DecodeError:
                changes = None
            if not isinstance(changes, dict):
                return await respond_json(send, 400, {"error": "body must be a JSON object"})
            if path == "/_sim/reset":
                self.reset(keep_config=bool(changes.get("keep_config", False)))
                return await respond_json(send, 200, {"ok": True})
            try:
                self.config.update(changes)
            except ValueError as exc:
                return await respond_json(send, 400, {"error": str(exc)})
            if "rng_seed" in changes:
                self.faults.reseed()
            return await respond_json(send, 200, self.config.as_dict())
        await respond_json(send, 404, {"error": "Not found"})

    # ------------------------------------------------------------------ helpers

    async def _delay(self, receive: Receive, send: Send, seconds: float) -> bool:
        """Sleep; False (and whatever answer is due) when the wait was cut short."""
        if seconds <= 0:
            return True
        outcome = await wait(receive, seconds, self._closing_event())
        if outcome == "closing":
            await self._error(send, 503, "Service unavailable")
        return outcome == "elapsed"

    async def _check_auth(self, scope: Scope, send: Send) -> bool:
        key = self.config.api_key
        if not key:
            return True
        value = header(scope, b"authorization")
        if value is None:
            message = "Missing API key: send 'Authorization: Bearer <key>'"
        else:
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip() == key:
                return True
            message = "Invalid API key"
        await respond_json(send, 401, self.wire.auth_error_body(message))
        return False

    async def _error(self, send: Send, status: int, message: str) -> None:
        headers: list[tuple[bytes, bytes]] = []
        if status == 429:
            headers.append((b"retry-after", retry_after(self.config.retry_after_s).encode()))
        wire = self.wire
        body = wire.auth_error_body(message) if status == 401 else wire.error_body(status, message)
        await respond_json(send, status, body, headers)

    async def _malformed(self, send: Send, kind: str) -> None:
        if kind == "shape":
            return await respond_json(send, 200, self.wire.malformed_shape_body())
        await respond(send, 200, _MALFORMED_TEXT, _HTML)

    def _base(self, scope: Scope) -> str:
        if self.public_base_url:
            return self.public_base_url
        host = header(scope, b"host")
        if host is None:
            server = scope.get("server") or ("127.0.0.1", 80)
            host = f"{server[0]}:{server[1]}"
        return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}"


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, Directives, str | None]:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None, Directives(), "Request body is not valid JSON"
    if not isinstance(body, dict):
        return None, Directives(), "Request body must be a JSON object"
    try:
        return body, parse_directives(body.get("prompt")), None
    except ValueError as exc:
        return body, Directives(), str(exc)


def create_app(
    kind: Kind, config: SimConfig | None = None, *, public_base_url: str | None = None
) -> SimulatorApp:
    """The ASGI app of a simulated `kind` upstream (serve it with any ASGI server).

    `public_base_url` is where clients reach it (for statusUrl, urls.get and image
    URLs); None: taken from each request's Host header.
    """
    return SimulatorApp(kind, config, public_base_url=public_base_url)
