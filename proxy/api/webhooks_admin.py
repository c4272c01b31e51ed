"""/admin/webhooks: every delivery and each of its POSTs, and redelivery
(FLUX_PROXY_ADMIN_KEY only). A delivery's id is the `webhook-id` its receiver saw."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get, post
from litestar.params import FromPath, Parameter

from proxy.accounts.auth import require_admin
from proxy.api.deps import ApiDep
from proxy.api.errors import error_response
from proxy.store.models import WEBHOOK_STATUSES, WebhookAttempt, WebhookDelivery


def delivery_view(d: WebhookDelivery, attempts: list[WebhookAttempt]) -> dict[str, Any]:
    return {
        "id": d.id,
        "prediction_id": d.prediction_id,
        "api_key_id": d.api_key_id,
        "event": d.event,
        "url": d.url,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at.isoformat() if d.status == "waiting" else None,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": d.created_at.isoformat(),
        "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
        "history": [{
            "n": a.n, "started_at": a.started_at.isoformat(), "duration_ms": a.duration_ms,
            "status_code": a.status_code, "error": a.error, "instance_id": a.instance_id,
        } for a in attempts],
    }


class AdminWebhooksController(Controller):
    path = "/admin/webhooks"
    tags = ["admin"]
    guards = [require_admin]

    @get("", summary="List webhook deliveries, newest first, with every POST made")
    async def list_deliveries(
        self, api: ApiDep,
        prediction_id: str | None = Parameter(default=None, max_length=36),
        status: str | None = Parameter(default=None, max_length=16),
        limit: int = Parameter(default=50, ge=1, le=500),
        before: str | None = Parameter(default=None, max_length=36,
                                       description="a delivery id: the page after it"),
    ) -> Response[Any]:
        if status is not None and status not in WEBHOOK_STATUSES:
            return error_response(422, f"status must be one of {', '.join(WEBHOOK_STATUSES)}")
        store = api.service.store
        rows = await store.list_webhooks(prediction_id=prediction_id, status=status,
                                         limit=limit, before=before)
        attempts = await store.webhook_attempts(d.id for d in rows)
        return Response({
            "data": [delivery_view(d, attempts.get(d.id, [])) for d in rows],
            "next_before": rows[-1].id if len(rows) == limit else None,
        })

    @get("/{delivery_id:str}", summary="One webhook delivery and every POST made")
    async def get_delivery(self, delivery_id: FromPath[str], api: ApiDep) -> Response[Any]:
        store = api.service.store
        row = await store.get_webhook(delivery_id)
        if row is None:
            return error_response(404, f"no webhook delivery {delivery_id}")
        attempts = await store.webhook_attempts([row.id])
        return Response(delivery_view(row, attempts.get(row.id, [])))

    @post("/{delivery_id:str}/redeliver", status_code=202,
          summary="Send a delivery again now (same webhook-id), with a fresh retry window")
    async def redeliver(self, delivery_id: FromPath[str], api: ApiDep) -> Response[Any]:
        store = api.service.store
        if not await store.redeliver_webhook(delivery_id):
            return error_response(404, f"no webhook delivery {delivery_id}")
        api.webhooks.nudge()
        row = await store.get_webhook(delivery_id)
        assert row is not None
        attempts = await store.webhook_attempts([row.id])
        return Response(delivery_view(row, attempts.get(row.id, [])), status_code=202)
