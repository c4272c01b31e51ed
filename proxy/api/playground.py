"""/playground: a browser page to try the API (a form, the results, the key's recent
predictions).

The page is static (proxy/api/playground/: index.html, app.js, app.css; plain
HTML/CSS/JS, no build step, nothing from a CDN, so it works offline) and holds no
data, so it needs no key itself: the key is typed into the page, kept in the
browser's sessionStorage (localStorage only when the user ticks "remember"), and
sent by the page's script as `Authorization: Bearer <key>` on each API call it
makes, never in a URL.

Its Content-Security-Policy lets it run only its own script and style, and talk only
to this proxy (`connect-src 'self'`). Images are the one exception: `img-src` also
allows http(s), because without `output_store` an output is the provider's own URL
(a CDN, or a simulator on loopback) and the page shows it as it is; an <img> load
carries no key (outputs this proxy keeps are fetched by the script, with the key,
and shown as blob: URLs), and `Referrer-Policy: no-referrer` keeps the page's
address from it. The routes are not in the OpenAPI document: they are not API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Response, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath

_DIR = Path(__file__).with_name("playground")
# name -> media type (litestar adds `; charset=utf-8` to text/*); only these are served:
# no path from the request reaches the disk.
_TYPES = {
    "app.js": "text/javascript",
    "app.css": "text/css",
}
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob: http: https:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return (_DIR / name).read_bytes()


_PAGE = _read("index.html")
_ASSETS = {name: (_read(name), media_type) for name, media_type in _TYPES.items()}


@get("/playground", include_in_schema=False, sync_to_thread=False)
def playground_page() -> Response[bytes]:
    """The page itself (no key needed: it holds no data)."""
    return Response(_PAGE, media_type="text/html", headers=SECURITY_HEADERS)


@get("/playground/{name:str}", include_in_schema=False, sync_to_thread=False)
def playground_asset(name: FromPath[str]) -> Response[bytes]:
    """The page's script and style sheet."""
    found = _ASSETS.get(name)
    if found is None:
        raise NotFoundException(f"no playground file {name}")
    body, media_type = found
    return Response(body, media_type=media_type, headers=SECURITY_HEADERS)


HANDLERS: list[Any] = [playground_page, playground_asset]
