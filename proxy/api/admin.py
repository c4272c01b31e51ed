"""/admin/keys: create, list, revoke client keys (FLUX_PROXY_ADMIN_KEY only)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath
from pydantic import ValidationError

from ..auth import Auth, require_admin
from ..keyspec import KeySpec, key_view
from ..schema import field_errors
from ..store.keys import DuplicateKeyName
from .errors import error_response


class AdminKeysController(Controller):
    path = "/admin/keys"
    tags = ["admin"]
    guards = [require_admin]

    @post("", status_code=201, summary="Create a client key (the key is shown once)")
    async def create(self, request: Request[Any, Any, Any]) -> Response[Any]:
        try:
            spec = KeySpec.model_validate_json(await request.body())
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                return error_response(400, "request body is not valid JSON", code="invalid_json")
            return error_response(422, "invalid key spec", details=field_errors(exc))
        auth: Auth = request.app.state.auth
        try:
            key, row = await auth.create(spec.name, **spec.fields())
        except DuplicateKeyName as exc:
            return error_response(409, str(exc))
        return Response({**key_view(row), "key": key}, status_code=201)

    @get("", summary="List client keys")
    async def list_keys(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        auth: Auth = request.app.state.auth
        return {"data": [key_view(k) for k in await auth.store.list_keys()]}

    @post("/{key:str}/revoke", status_code=200, summary="Revoke a key (by id or name)")
    async def revoke(self, request: Request[Any, Any, Any], key: FromPath[str]) -> Response[Any]:
        auth: Auth = request.app.state.auth
        row = await auth.store.find_key(key)
        if row is None:
            return error_response(404, f"no key {key}")
        if not await auth.revoke(row.id):
            return error_response(409, f"key {row.name} is already revoked")
        revoked = await auth.store.find_key(row.id)
        assert revoked is not None
        return Response(key_view(revoked))
