"""The OpenAPI document at /schema: the bearer security of every guarded route, and
pages that work offline.

Security is derived, not listed: when a document is served, each operation whose
route handler carries `require_key` or `require_admin` (on itself or any layer above
it: controller, router) is given `security`, and every other operation has none. A
route added later is right without touching this file.

Litestar's own pages (ReDoc, Swagger, Elements, RapiDoc) load scripts, styles and
fonts from CDNs, so they are blank on a machine without internet access. /schema is
instead one self-contained HTML page rendered here from the document (no script, no
external link); /schema/openapi.json (and .yaml) is the document for real tools.
The former UI paths show the same page, so old bookmarks keep working.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterator
from typing import Any

from litestar import Litestar, Request
from litestar.enums import MediaType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, OpenAPIRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.routes import HTTPRoute

from proxy.accounts.auth import require_admin, require_key

CLIENT_KEY, ADMIN_KEY = "clientKey", "adminKey"
SECURITY_SCHEMES: dict[str, SecurityScheme] = {
    CLIENT_KEY: SecurityScheme(
        type="http", scheme="bearer",
        description="A client key (fpk_...) made with POST /admin/keys, sent as "
        "`Authorization: Bearer <key>`; the admin key is accepted too.",
    ),
    ADMIN_KEY: SecurityScheme(
        type="http", scheme="bearer",
        description="The admin key (FLUX_PROXY_ADMIN_KEY), sent as `Authorization: Bearer <key>`.",
    ),
}
# Guard -> the scheme it checks. A guarded route needs every scheme of its guards.
GUARD_SCHEMES: dict[Callable[..., Any], str] = {require_key: CLIENT_KEY,
                                                require_admin: ADMIN_KEY}
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Litestar's UI paths before this page replaced them.
_LEGACY_PAGES = ("/redoc", "/swagger", "/elements", "/rapidoc", "/scalar")


def guarded_operations(app: Litestar) -> Iterator[tuple[str, str, list[str]]]:
    """(path as in the document, method, security schemes) of every HTTP handler."""
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            schemes = [GUARD_SCHEMES[g] for g in handler.resolve_guards() if g in GUARD_SCHEMES]
            for method in handler.http_methods:
                yield route.path_format or "/", method.lower(), list(dict.fromkeys(schemes))


def secure(app: Litestar, schema: dict[str, Any]) -> dict[str, Any]:
    """Give each operation of `schema` (in place) the security its guards enforce,
    and none to the unguarded ones. Idempotent."""
    paths: dict[str, Any] = schema.get("paths") or {}
    for path, method, schemes in guarded_operations(app):
        op = (paths.get(path) or {}).get(method)
        if not isinstance(op, dict):
            continue  # not in the document (include_in_schema=False)
        if schemes:
            op["security"] = [{name: [] for name in schemes}]
        else:
            op.pop("security", None)
    components = schema.setdefault("components", {})
    schemes_doc = components.setdefault("securitySchemes", {})
    for name, scheme in SECURITY_SCHEMES.items():
        schemes_doc.setdefault(name, scheme.to_schema())
    return schema


class SecureJsonPlugin(JsonRenderPlugin):
    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, secure(request.app, openapi_schema))


class SecureYamlPlugin(YamlRenderPlugin):
    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, secure(request.app, openapi_schema))


# --------------------------------------------------------------------------- the page

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#222}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #ccc}
details{border:1px solid #ddd;border-radius:4px;margin:.4rem 0;padding:.3rem .6rem}
summary{cursor:pointer}code,pre{font:13px ui-monospace,monospace}
pre{background:#f6f6f6;padding:.6rem;overflow:auto;max-height:30rem}
.m{display:inline-block;min-width:4.5rem;font-weight:bold;text-transform:uppercase}
.get{color:#0a6}.post{color:#06c}.delete{color:#c33}.put,.patch{color:#a60}
.lock{color:#a60}.open{color:#888}table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pre(value: Any) -> str:
    return f"<pre>{_e(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre>"


def _type(schema: dict[str, Any]) -> str:
    """A parameter's type in a few words ("string or null" for a oneOf)."""
    if "type" in schema:
        return str(schema["type"])
    return " or ".join(_type(s) for s in schema.get("oneOf") or schema.get("anyOf") or [])


def _operation(path: str, method: str, op: dict[str, Any]) -> str:
    security = op.get("security") or []
    auth = (f'<span class="lock">bearer: {_e(", ".join(n for req in security for n in req))}'
            "</span>" if security else '<span class="open">no auth</span>')
    parts = [f'<details><summary><span class="m {method}">{method}</span> <code>{_e(path)}'
             f"</code> {_e(op.get('summary', ''))} &mdash; {auth}</summary>"]
    if op.get("description"):
        parts.append(f"<p>{_e(op['description'])}</p>")
    if op.get("parameters"):
        rows = "".join(f"<tr><td><code>{_e(p.get('name'))}</code></td><td>{_e(p.get('in'))}"
                       f"</td><td>{_e(_type(p.get('schema', {})))}</td><td>"
                       f"{'yes' if p.get('required') else 'no'}</td></tr>"
                       for p in op["parameters"])
        parts.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>required"
                     f"</th></tr>{rows}</table>")
    body = op.get("requestBody", {}).get("content", {})
    for media_type, content in body.items():
        parts.append(f"<p>Request body (<code>{_e(media_type)}</code>):</p>"
                     + _pre(content.get("schema", {})))
    responses = op.get("responses") or {}
    if responses:
        rows = "".join(f"<tr><td>{_e(code)}</td><td>{_e(r.get('description', ''))}</td></tr>"
                       for code, r in responses.items())
        parts.append(f"<table><tr><th>status</th><th>response</th></tr>{rows}</table>")
    parts.append("</details>")
    return "".join(parts)


def render_page(schema: dict[str, Any], json_path: str) -> str:
    """The whole document as one HTML page: nothing is loaded from anywhere else."""
    info = schema.get("info", {})
    by_tag: dict[str, list[str]] = {}
    for path, item in (schema.get("paths") or {}).items():
        for method in _METHODS:
            op = item.get(method)
            if isinstance(op, dict):
                tag = (op.get("tags") or ["other"])[0]
                by_tag.setdefault(tag, []).append(_operation(path, method, op))
    schemes = (schema.get("components") or {}).get("securitySchemes") or {}
    auth = "".join(f"<li><code>{_e(name)}</code>: {_e(s.get('type'))} "
                   f"{_e(s.get('scheme', ''))} &mdash; {_e(s.get('description', ''))}</li>"
                   for name, s in schemes.items())
    sections = "".join(f"<h2>{_e(tag)}</h2>{''.join(ops)}" for tag, ops in by_tag.items())
    models = (schema.get("components") or {}).get("schemas") or {}
    model_docs = "".join(f"<details><summary><code>{_e(name)}</code></summary>{_pre(s)}"
                         "</details>" for name, s in sorted(models.items()))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(info.get('title', 'API'))}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(info.get('title', 'API'))} <small>{_e(info.get('version', ''))}</small></h1>"
        f"<p>The OpenAPI document: <a href='{_e(json_path)}'>{_e(json_path)}</a> "
        "(load it into any OpenAPI tool). This page works offline.</p>"
        f"<h2>Authentication</h2><ul>{auth}</ul>{sections}"
        f"<h2>Schemas</h2>{model_docs}</body></html>"
    )


class OfflinePagePlugin(OpenAPIRenderPlugin):
    def __init__(self) -> None:
        super().__init__(path=["/", *_LEGACY_PAGES], media_type=MediaType.HTML, favicon="")

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        schema = secure(request.app, openapi_schema)
        return render_page(schema, self.get_openapi_json_route(request)).encode()


def openapi_config(title: str, version: str, path: str = "/schema") -> OpenAPIConfig:
    """The app's OpenAPI config: security schemes declared, offline pages."""
    return OpenAPIConfig(
        title=title,
        version=version,
        path=path,
        components=Components(security_schemes=dict(SECURITY_SCHEMES)),
        render_plugins=[OfflinePagePlugin(), SecureJsonPlugin(), SecureYamlPlugin()],
    )
