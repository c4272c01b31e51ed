"""/admin/keys: create, list, revoke client keys, rotate their webhook signing secrets
(FLUX_PROXY_ADMIN_KEY only)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath
from pydantic import ValidationError

from proxy import metrics
from proxy.accounts.auth import require_admin
from proxy.accounts.keyspec import KeySpec, key_view
from proxy.api.deps import ApiDep
from proxy.api.errors import error_response
from proxy.schema import field_errors
from proxy.store.keys import DuplicateKeyName


class AdminKeysController(Controller):
    path = "/admin/keys"
    tags = ["admin"]
    guards = [require_admin]

    @post("", status_code=201, summary="Create a client key (the key is shown once)")
    async def create(self, request: Request[Any, Any, Any], api: ApiDep) -> Response[Any]:
        auth = api.auth
        try:
            spec = KeySpec.model_validate_json(await request.body())
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                return error_response(400, "request body is not valid JSON", code="invalid_json")
            return error_response(422, "invalid key spec", details=field_errors(exc))
        try:
            key, row = await auth.create(spec.name, **spec.fields())
        except DuplicateKeyName as exc:
            return error_response(409, str(exc))
        await api.service.budgets.publish(row)  # its budget gauges, from the start
        metrics.precreate_keys(api.service.router.enabled, api.settings.models, [row.name])
        return Response({**key_view(row), "key": key, "webhook_secret": row.webhook_secret},
                        status_code=201)

    @get("", summary="List client keys")
    async def list_keys(self, api: ApiDep) -> dict[str, Any]:
        return {"data": [key_view(k) for k in await api.auth.store.list_keys()]}

    @post("/{key:str}/webhook-secret", status_code=200,
          summary="Rotate a key's webhook signing secret (the new one is shown once; the "
                  "old one keeps signing for webhook_secret_grace_s)")
    async def rotate_webhook_secret(self, key: FromPath[str], api: ApiDep) -> Response[Any]:
        row = await api.auth.store.find_key(key)
        if row is None:
            return error_response(404, f"no key {key}")
        if row.revoked_at is not None:
            return error_response(409, f"key {row.name} is revoked")
        rotated = await api.auth.rotate_webhook_secret(row, api.settings.webhook_secret_grace_s)
        return Response({**key_view(rotated), "webhook_secret": rotated.webhook_secret})

    @post("/{key:str}/revoke", status_code=200, summary="Revoke a key (by id or name)")
    async def revoke(self, key: FromPath[str], api: ApiDep) -> Response[Any]:
        auth = api.auth
        row = await auth.store.find_key(key)
        if row is None:
            return error_response(404, f"no key {key}")
        if not await auth.revoke(row.id):
            return error_response(409, f"key {row.name} is already revoked")
        revoked = await auth.store.find_key(row.id)
        assert revoked is not None
        return Response(key_view(revoked))
