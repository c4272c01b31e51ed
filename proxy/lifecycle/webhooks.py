"""Webhooks: what a request subscribes to, and sending what is due, at least once.

A request with `webhook` gets one delivery row per event of `webhook_events_filter`,
inserted with its prediction (store/webhooks.py). Every process runs a dispatcher:
it leases due deliveries (any replica's predictions; after a restart, the ones it
had not sent), POSTs the prediction in the unified shape through the outbound guard,
signed per Standard Webhooks with the `standardwebhooks` library (webhook-id: the
delivery's id, the same on every retry; webhook-timestamp; webhook-signature with
the key's secret, and its previous one during a rotation's grace), and records
every POST. A non-2xx answer or no answer is retried with exponential backoff until
`webhook_retry_window_s` after the first try; then the delivery is `failed`.
An admin can redeliver any delivery (api/webhooks_admin.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from standardwebhooks import Webhook

from common import media
from common.logging import get_logger
from proxy.accounts.webhook_secrets import signing_secrets
from proxy.lifecycle.polling import backoff_s
from proxy.schema import GenerateRequest
from proxy.store.models import WEBHOOK_EVENTS, Attempt, Prediction, WebhookDelivery, utcnow
from proxy.store.repo import Store
from proxy.store.webhooks import AttemptResult

log = get_logger("flux_proxy.webhooks")
EVENT_HEADER = "X-Flux-Webhook-Event"
HISTORY_SWEEP_S = 3600.0
# Renders a prediction as the body a receiver gets (the app passes api/render's view).
Render = Callable[[Prediction, list[Attempt], str], bytes]


class NoSigningSecret(Exception):
    """The prediction's key has no webhook secret (or none is configured for keyless
    predictions): a webhook could not be signed, so the request is refused."""


@dataclass(frozen=True)
class WebhookConfig:
    timeout_s: float = 10.0
    retry_window_s: float = 86_400.0
    backoff_s: float = 5.0
    backoff_max_s: float = 600.0
    poll_s: float = 1.0  # how often the database is asked for due deliveries
    lease_s: float = 25.0  # longer than one POST may take
    batch: int = 50
    concurrency: int = 16  # POSTs at once, per process
    keyless_secret: str | None = None  # signs predictions made without a client key
    history_s: float = 7 * 86_400.0  # finished deliveries (and their POSTs) kept this long


class WebhookDispatcher:
    def __init__(self, store: Store, render: Render, *, instance_id: str,
                 guard: media.OutboundGuard, config: WebhookConfig | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.store = store
        self.render = render
        self.instance_id = instance_id
        self.guard = guard
        self.config = config or WebhookConfig()
        self._own_client = client is None
        # No proxies from the environment: the guard must see where we connect.
        self._client = client or httpx.AsyncClient(trust_env=False, timeout=self.config.timeout_s)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._slots = asyncio.Semaphore(self.config.concurrency)

    # ------------------------------------------------------------------ admission

    async def check(self, req: GenerateRequest, key_secret_ok: bool) -> None:
        """Before anything is written: the URL passes the guard (BlockedURL /
        MediaError) and there is a secret to sign with (NoSigningSecret)."""
        if req.webhook is None:
            return
        if not key_secret_ok:
            raise NoSigningSecret(
                "this client key has no webhook signing secret: create one with "
                "`flux-proxy keys webhook-secret <name>` (or POST "
                "/admin/keys/<name>/webhook-secret)")
        await self.guard.resolve(req.webhook)

    def keyless_ok(self) -> bool:
        return bool(self.config.keyless_secret)

    # ------------------------------------------------------------------ running

    async def start(self) -> None:
        # Leases of ours from before a crash: this process will not finish those POSTs.
        await self.store.release_webhook_leases(self.instance_id)
        self._task = asyncio.create_task(self._loop(), name="webhook-dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            # Let POSTs under way finish and be recorded (bounded), then stop.
            self._stopping = True
            self._wake.set()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task),
                                       timeout=min(10.0, self.config.timeout_s + 1))
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            # POSTs cut short: whoever runs next sends them (at least once).
            with contextlib.suppress(Exception):
                await self.store.release_webhook_leases(self.instance_id)
        if self._own_client:
            await self._client.aclose()

    def nudge(self) -> None:
        """Something may be due now (a prediction ended here): look without waiting."""
        self._wake.set()

    async def _loop(self) -> None:
        swept_at = float("-inf")
        while not self._stopping:
            if time.monotonic() - swept_at > HISTORY_SWEEP_S:  # bounds the two tables
                swept_at = time.monotonic()
                with contextlib.suppress(Exception):
                    cutoff = utcnow() - timedelta(seconds=self.config.history_s)
                    if swept := await self.store.sweep_webhooks(cutoff):
                        log.info("webhook.history_swept", count=swept)
            try:
                sent = await self.run_once()
            except Exception:  # a database blip must not stop deliveries for good
                log.exception("webhook.dispatch_failed")
                sent = 0
            if sent >= self.config.batch or self._stopping:
                continue  # more may be due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.poll_s)
            self._wake.clear()

    async def run_once(self) -> int:
        """Lease what is due, send it all, record each POST; how many were sent."""
        due = await self.store.claim_webhooks(self.instance_id, self.config.lease_s,
                                              self.config.batch)
        # One prediction's events one after another, in firing order (a receiver sees
        # start before completed unless a retry reorders them); predictions at once.
        by_prediction: dict[str, list[WebhookDelivery]] = {}
        for d in due:
            by_prediction.setdefault(d.prediction_id, []).append(d)
        if due:
            await asyncio.gather(*(self._send_in_order(ds) for ds in by_prediction.values()))
        return len(due)

    async def _send_in_order(self, deliveries: list[WebhookDelivery]) -> None:
        for d in sorted(deliveries, key=lambda d: WEBHOOK_EVENTS.index(d.event)):
            await self._send(d)

    async def _send(self, delivery: WebhookDelivery) -> None:
        async with self._slots:
            started = utcnow()
            t0 = time.perf_counter()
            status: int | None = None
            error: str | None = None
            try:
                prepared = await self._prepare(delivery)
                if prepared is None:  # an `output` that will never come
                    await self.store.skip_webhook(delivery.id, self.instance_id)
                    return
                body, secrets = prepared
                status = await media.guarded_post(
                    self._client, delivery.url, content=body,
                    headers=sign(secrets, delivery.id, started, body, delivery.event),
                    guard=self.guard, timeout_s=self.config.timeout_s)
                if not 200 <= status < 300:
                    error = f"receiver answered HTTP {status}"
            except (media.MediaError, NoSigningSecret, LookupError) as exc:
                error = str(exc)
            duration_ms = round((time.perf_counter() - t0) * 1000)
            result = self._outcome(delivery, started, duration_ms, status, error)
            await self.store.record_webhook_attempt(delivery, self.instance_id, result)
            log.info("webhook.sent" if error is None else "webhook.failed",
                     delivery_id=delivery.id, prediction_id=delivery.prediction_id,
                     webhook_event=delivery.event, attempt=delivery.attempts + 1,
                     status_code=status, error=error, next=result.next_status)

    async def _prepare(self, delivery: WebhookDelivery) -> tuple[bytes, list[str]] | None:
        """The signed body's parts; None for an `output` event of a prediction that
        ended without outputs (failed, canceled)."""
        found = await self.store.get_with_attempts(delivery.prediction_id)
        if found is None:
            raise LookupError(f"prediction {delivery.prediction_id} is gone")
        pred, attempts = found
        if delivery.event == "output" and pred.status != "completed":
            return None
        if delivery.api_key_id is None:
            secrets = [self.config.keyless_secret] if self.config.keyless_secret else []
        else:
            key = await self.store.find_key(delivery.api_key_id)
            secrets = signing_secrets(key) if key is not None else []
        if not secrets:
            raise NoSigningSecret("no webhook signing secret for this prediction's key")
        return self.render(pred, attempts, delivery.base_url), secrets

    def _outcome(self, delivery: WebhookDelivery, started: datetime, duration_ms: int,
                 status: int | None, error: str | None) -> AttemptResult:
        if error is None:
            return AttemptResult(started, duration_ms, status, None, "delivered", started)
        first = delivery.first_attempt_at or started
        n = delivery.attempts + 1
        wait = backoff_s(self.config.backoff_s, 2.0, self.config.backoff_max_s, n)
        next_at = utcnow() + timedelta(seconds=wait)
        if next_at > first + timedelta(seconds=self.config.retry_window_s):
            return AttemptResult(started, duration_ms, status, error, "failed", next_at)
        return AttemptResult(started, duration_ms, status, error, "waiting", next_at)


def subscriptions(req: GenerateRequest, prediction_id: str, api_key_id: str | None,
                  base_url: str) -> list[WebhookDelivery]:
    """The rows a request's webhook makes, in firing order."""
    if req.webhook is None:
        return []
    events = sorted(set(req.webhook_events_filter), key=WEBHOOK_EVENTS.index)
    return [WebhookDelivery(prediction_id=prediction_id, api_key_id=api_key_id,
                            event=event, url=req.webhook, base_url=base_url)
            for event in events]


def sign(secrets: list[str], msg_id: str, at: datetime, body: bytes,
         event: str) -> dict[str, str]:
    """The Standard Webhooks headers: one `v1,` signature per secret."""
    text = body.decode("utf-8")
    signatures = " ".join(Webhook(s).sign(msg_id, at, text) for s in secrets)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signatures,
        EVENT_HEADER: event,
    }

