"""/schema: bearer security on exactly the guarded operations (derived from the
guards, so new routes are right too), and pages that load nothing from the internet."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from litestar import Controller, Litestar, get
from litestar.params import FromPath
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from proxy.accounts.auth import require_admin, require_key
from proxy.api.openapi import openapi_config
from proxy.app import create_app

from .conftest import make_settings

GUARDS = (require_key, require_admin)
# src= / href= / url(...) / @import that point off the machine.
EXTERNAL = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?|@import\s+["']?)"""
                      r"""\s*(?:https?:)?//""", re.IGNORECASE)


@pytest.fixture
def app(tmp_path: Path) -> Litestar:
    return create_app(make_settings(tmp_path, {}, auth_enabled=True, admin_key="adm"))


def operations(app: Litestar) -> dict[tuple[str, str], bool]:
    """(path, method) -> whether its handler is guarded, for every documented handler."""
    out = {}
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            for handler in route.route_handlers:
                if handler.resolve_include_in_schema():
                    guarded = any(g in GUARDS for g in handler.resolve_guards())
                    for method in handler.http_methods:
                        out[(route.path_format, method.lower())] = guarded
    return out


def is_bearer(spec: dict[str, Any], security: list[dict[str, list[str]]]) -> bool:
    schemes = spec["components"]["securitySchemes"]
    return bool(security) and all(
        schemes[name]["type"] == "http" and schemes[name]["scheme"] == "bearer"
        for requirement in security for name in requirement)


async def test_guarded_operations_and_only_those_declare_bearer_security(
    app: Litestar
) -> None:
    async with AsyncTestClient(app) as c:
        r = await c.get("/schema/openapi.json")
        assert r.status_code == 200
        spec = r.json()
        yaml_spec = yaml.safe_load((await c.get("/schema/openapi.yaml")).text)
    expected = operations(app)
    # What a reader relies on, by name; the loop below covers every other route.
    for path, method, guarded in (("/v1/predictions", "post", True),
                                  ("/v1/predictions/{prediction_id}", "get", True),
                                  ("/admin/keys", "post", True),
                                  ("/api/v1/models/{model}/generate", "post", True),
                                  ("/healthz", "get", False), ("/readyz", "get", False),
                                  ("/metrics", "get", False)):
        assert expected[(path, method)] is guarded, (path, method)
    documented = {(p, m) for p, item in spec["paths"].items() for m in item}
    assert set(expected) == documented
    for (path, method), guarded in expected.items():
        op = spec["paths"][path][method]
        if guarded:
            assert is_bearer(spec, op.get("security", [])), (path, method, op.get("security"))
        else:
            assert "security" not in op, (path, method)
        assert yaml_spec["paths"][path][method].get("security") == op.get("security")
    assert spec.get("security") is None  # no document-wide default that open routes inherit
    # The request body the native API parses itself is still documented.
    create = spec["paths"]["/v1/predictions"]["post"]
    props = create["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"prompt", "size", "enable_sync_mode", "enable_base64_output"} <= set(props)
    # So a generated client can send it.
    assert {"name": "Idempotency-Key", "in": "header"}.items() <= next(
        p for p in create["parameters"] if p["name"] == "Idempotency-Key").items()


async def test_a_route_added_later_is_secured_from_its_guard_alone() -> None:
    class Things(Controller):
        path = "/things"
        guards = [require_key]

        @get("/{thing_id:str}", sync_to_thread=False)
        def one(self, thing_id: FromPath[str]) -> str:
            return thing_id

    @get("/open", sync_to_thread=False)
    def open_route() -> str:
        return "ok"

    @get("/admin-only", guards=[require_admin], sync_to_thread=False)
    def admin_only() -> str:
        return "ok"

    app = Litestar([Things, open_route, admin_only],
                   openapi_config=openapi_config(title="t", version="1"))
    async with AsyncTestClient(app) as c:
        spec = (await c.get("/schema/openapi.json")).json()
    paths = spec["paths"]
    assert paths["/things/{thing_id}"]["get"]["security"] == [{"clientKey": []}]
    assert paths["/admin-only"]["get"]["security"] == [{"adminKey": []}]
    assert "security" not in paths["/open"]["get"]
    assert is_bearer(spec, [{"clientKey": []}, {"adminKey": []}])


async def test_every_schema_page_works_offline(app: Litestar) -> None:
    pages = {"/schema", "/schema/", "/schema/swagger", "/schema/redoc", "/schema/elements",
             "/schema/rapidoc", "/schema/no-such-page"}
    pages |= {r.path for r in app.routes if r.path.startswith("/schema")
              and "{" not in r.path}
    html_pages = 0
    async with AsyncTestClient(app) as c:
        for path in sorted(pages):
            r = await c.get(path)
            if not r.headers.get("content-type", "").startswith("text/html"):
                continue
            html_pages += 1
            found = EXTERNAL.findall(r.text)
            assert not found, (path, found)
            assert "<script" not in r.text.lower(), path
        root = await c.get("/schema")
        assert root.status_code == 200
        # The page documents the API itself, and says how to authenticate.
        assert "/api/v1/models/{model}/generate" in root.text and "bearer" in root.text
        assert "/schema/openapi.json" in root.text
    assert html_pages >= 3
