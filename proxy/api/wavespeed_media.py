"""WaveSpeed's wire shape (the ``{code, message, data}`` envelope and its errors, shared
with proxy/api/wavespeed_compat.py) and its media upload routes, which the official SDK's
``Client.upload(path)`` and WaveSpeed's documented binary upload use:

* ``POST /api/v3/media/uploads`` (key) ``{filename, size, content_type?}`` -> an upload
  instruction ``{upload: {method: "PUT", url, headers}, download_url}``. The SDK then PUTs
  the bytes to ``url`` with only ``headers`` (no Authorization): ``url`` is a signed,
  single-use capability good for an hour (proxy/uploads.py ``Ticket``).
* ``PUT /api/v3/media/uploads/{id}?...signature=`` (the capability) the bytes: exactly the
  declared size, a real image within the request-image limits, else 400/413 and nothing kept.
* ``POST /api/v3/media/upload/binary`` (key, multipart field ``file``) -> ``{type,
  download_url, filename, size}``, as WaveSpeed answers it.
* ``GET /api/v3/media/files/{id}.{ext}`` (no key: the unguessable id is the capability,
  like WaveSpeed's public download URLs) the stored image; 404 once past retention.

Uploads feed image inputs (``image``, ``mask_image``), so only images are taken, at
most the schema's IMAGE_MAX_BYTES.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlencode

import msgspec
from litestar import MediaType, Request, Response, get, head, post, put
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.params import FromPath

from common import media
from common.logging import get_logger
from proxy.accounts.auth import principal_of, require_key
from proxy.api.deps import ApiDep
from proxy.api.render import base_url
from proxy.uploads import (
    Ticket,
    UploadError,
    download_url,
    file_name,
    format_of,
    max_upload_bytes,
    new_id,
    parse_file_name,
    store_for,
    validate_image,
)

log = get_logger("flux_proxy.api.wavespeed")

# --------------------------------------------------------------------------- the wire shape


def envelope(data: Any, *, headers: dict[str, str] | None = None) -> Response[Any]:
    """WaveSpeed's success answer: HTTP 200 ``{code: 200, message: "success", data}``."""
    return Response({"code": 200, "message": "success", "data": data}, status_code=200,
                    media_type=MediaType.JSON, headers=headers)


def ws_error(status: int, message: str, *, headers: dict[str, str] | None = None
             ) -> Response[Any]:
    """WaveSpeed's error answer: the HTTP status, and the same code in the envelope
    (``data`` null; a bad key is ``{code: 401, message}``), which the SDK prints and
    our own adapter (providers/wavespeed.py) maps like an HTTP status."""
    body: dict[str, Any] = {"code": status, "message": message}
    if status != 401:
        body["data"] = None
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def upload_error(exc: UploadError) -> Response[Any]:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return ws_error(exc.status, exc.message, headers=headers)


def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own exceptions on WaveSpeed routes: the key guard's 401, 413 (body
    too large), a form that does not parse, the decode-budget 503."""
    headers = dict(exc.headers or {})
    if isinstance(exc, NotAuthorizedException):
        return ws_error(401, f"Unauthorized: {exc.detail}", headers=headers)
    if exc.status_code == 413:
        return ws_error(413, "Request body too large (max_body_bytes)", headers=headers)
    return ws_error(exc.status_code, str(exc.detail), headers=headers)


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("http.unhandled", path=request.url.path, error_type=type(exc).__name__)
    return ws_error(500, "Internal server error, please retry.")


EXCEPTION_HANDLERS: dict[Any, Any] = {HTTPException: http_error, Exception: internal_error}

# --------------------------------------------------------------------------- media routes


def _limit_error(param: str, size: int, limit: int) -> Response[Any]:
    return ws_error(413, f"Invalid parameter {param}: the file is {size} bytes; uploads are "
                    f"image inputs of at most {limit} bytes")


@post("/media/uploads", guards=[require_key], status_code=200,
      summary="WaveSpeed: an upload URL for one image (the SDK's upload())")
async def create_upload(request: Request[Any, Any, Any], api: ApiDep) -> Response[Any]:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        return ws_error(400, f"Invalid request body: not JSON ({exc})")
    if not isinstance(body, dict):
        return ws_error(400, "Invalid request body: a JSON object is expected")
    filename, size, content_type = body.get("filename"), body.get("size"), body.get(
        "content_type")
    if not isinstance(filename, str) or not filename or len(filename) > 255:
        return ws_error(400, "Invalid parameter filename: a file name of 1 to 255 "
                        "characters is required")
    if type(size) is not int or size <= 0:
        return ws_error(400, f"Invalid parameter size: the file's size in bytes (a positive "
                        f"integer) is required, got {size!r}")
    if content_type is not None and not isinstance(content_type, str):
        return ws_error(400, "Invalid parameter content_type: a MIME type string")
    fmt = format_of(filename, content_type)
    if content_type and fmt is None:
        return ws_error(400, f"Invalid parameter content_type: {content_type[:64]!r} is not "
                        "accepted; flux-proxy takes image inputs only (image/jpeg, image/png, "
                        "image/gif, image/webp)")
    limit = max_upload_bytes(api.settings)
    if size > limit:
        return _limit_error("size", size, limit)
    ticket = Ticket.issue(size, fmt, principal_of(request).key_id)
    base = base_url(request, api.settings).rstrip("/")
    query = urlencode(ticket.query(await api.auth.secret()))
    return envelope({
        "upload": {"method": "PUT", "url": f"{base}/api/v3/media/uploads/{ticket.upload_id}"
                   f"?{query}",
                   # The canonical type, not the client's string echoed back.
                   "headers": {"Content-Type": media.MIME_TYPES.get(
                       fmt or "", "application/octet-stream")}},
        "download_url": download_url(base, ticket.upload_id, fmt),
        "expires_at": ticket.expires,
    })


@put("/media/uploads/{upload_id:str}", status_code=200, include_in_schema=False)
async def put_upload(request: Request[Any, Any, Any], upload_id: FromPath[str], api: ApiDep
                     ) -> Response[Any]:
    """The bytes, to a signed upload URL; no key (the URL is the capability)."""
    try:
        ticket = Ticket.verify(upload_id, dict(request.query_params),
                               await api.auth.secret())
    except UploadError as exc:
        return upload_error(exc)
    store = store_for(api.settings)
    if await store.get(upload_id) is not None:
        return ws_error(409, "this upload URL was already used")
    announced = request.content_length
    if announced is not None and announced != ticket.size:
        return ws_error(400, f"Content-Length is {announced} bytes but the upload was "
                        f"declared as {ticket.size}; ask for a new upload URL with the "
                        "right size")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > ticket.size:
            return ws_error(400, f"the body is longer than the declared size "
                            f"({ticket.size} bytes)")
        chunks.append(chunk)
    if received != ticket.size:
        return ws_error(400, f"the body is {received} bytes but the upload was declared "
                        f"as {ticket.size}")
    data = b"".join(chunks)
    del chunks
    try:
        info = await validate_image(data)
        upload = await store.save(upload_id, data, info, key_id=ticket.key_id or None,
                                  filename=None)
    except UploadError as exc:
        return upload_error(exc)
    base = base_url(request, api.settings)
    return envelope({"download_url": download_url(base, upload.id, ticket.fmt or upload.format),
                     "size": upload.size, "type": "image"})


@post("/media/upload/binary", guards=[require_key], status_code=200,
      summary="WaveSpeed: upload one image (multipart field 'file')")
async def upload_binary(request: Request[Any, Any, Any], api: ApiDep) -> Response[Any]:
    if request.content_type[0] != "multipart/form-data":
        return ws_error(400, "Invalid request: send multipart/form-data with the image in "
                        "the field 'file'")
    form = await request.form()
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        return ws_error(400, "Invalid parameter file: an uploaded file is required (the "
                        "multipart field 'file')")
    data = await upload.read()
    limit = max_upload_bytes(api.settings)
    if len(data) > limit:
        return _limit_error("file", len(data), limit)
    filename = (upload.filename or "upload")[:255]
    try:
        info = await validate_image(data)
        stored = await store_for(api.settings).save(
            new_id(), data, info, key_id=principal_of(request).key_id, filename=filename)
    except UploadError as exc:
        return upload_error(exc)
    base = base_url(request, api.settings)
    return envelope({"type": "image", "download_url": download_url(base, stored.id,
                                                                   stored.format),
                     "filename": filename, "size": stored.size})


@get("/media/files/{name:str}", status_code=200, include_in_schema=False)
async def get_file(name: FromPath[str], api: ApiDep) -> Response[Any]:
    """An uploaded image; no key (its unguessable id is the capability)."""
    upload_id = parse_file_name(name)
    found = await store_for(api.settings).read(upload_id) if upload_id else None
    if found is None:
        return ws_error(404, "File not found (unknown, or older than media_retention_s)")
    upload, data = found
    return Response(data, status_code=200, media_type=upload.content_type, headers={
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": f'inline; filename="{file_name(upload.id, upload.format)}"',
    })


@head("/media/files/{name:str}", status_code=200, include_in_schema=False)
async def head_file(name: FromPath[str], api: ApiDep) -> Response[None]:
    """What GET would serve, without the body (some fetchers look first)."""
    upload_id = parse_file_name(name)
    upload = await store_for(api.settings).get(upload_id) if upload_id else None
    headers = {"X-Content-Type-Options": "nosniff"}
    if upload is not None:
        headers["Content-Length"] = str(upload.size)
    # Litestar wants HEAD handlers typed bodiless, and cannot render None as an image type.
    return cast("Response[None]", Response(
        b"", status_code=200 if upload else 404, headers=headers,
        media_type=upload.content_type if upload else MediaType.JSON))


MEDIA_HANDLERS: list[Any] = [create_upload, put_upload, upload_binary, get_file, head_file]
