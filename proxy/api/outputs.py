"""GET /v1/predictions/{id}/outputs/{n}: an output the proxy keeps (`output_store`).

`n` is 0-based, the output's index in the prediction's `outputs`. The caller's key
must see the prediction (the rule of GET /v1/predictions/{id}: its own, or the admin
key), or the URL must carry the signature the proxy listed it with (SDK code downloads
image URLs bare); anything else is 404, as are an index out of range, an output that
was not kept (it is the provider's URL in `outputs`), one past `output_retention_s`, and every
`output_store` that is off. The bytes are streamed from the store as they are read.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, get
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, Parameter
from litestar.response import Stream

from proxy.accounts.auth import Principal, principal_of, require_key
from proxy.api.deps import ApiDep
from proxy.api.errors import error_response
from proxy.lifecycle.service import NotFound
from proxy.outputs_store import StoreError, output_path
from proxy.schema import ErrorResponse

# Images are compressed already: the app's gzip middleware skips handlers with this opt.
SKIP_COMPRESSION = "skip_compression"


async def require_key_or_signature(connection: ASGIConnection[Any, Any, Any, Any],
                                   handler: BaseRouteHandler) -> None:
    """The caller's key, or a valid signature for this very path (the URL the proxy
    listed: outputs_store/signing.py), which grants this one output and nothing else."""
    store = connection.app.state.get("output_store")
    params = connection.query_params
    expires, sig = params.get("expires"), params.get("sig")
    if (store is not None and isinstance(expires, str) and isinstance(sig, str)
            and store.signature_valid(connection.url.path, expires, sig)):
        connection.state.principal = Principal()  # sees it: the signature is the grant
        return
    await require_key(connection, handler)


@get("/v1/predictions/{prediction_id:str}/outputs/{n:str}",
     guards=[require_key_or_signature],
     tags=["predictions"], opt={SKIP_COMPRESSION: True},
     summary="Get an output image the proxy keeps (n is 0-based)",
     description="Output `n` (0-based, its index in `outputs`) of a prediction the key can "
     "see, with its image Content-Type. Listed in `outputs` when `output_store` is set; "
     "404 for another key's prediction, an index out of range, an output that was not "
     "kept (`outputs` then has the provider's URL) or one past `output_retention_s`.",
     responses={200: ResponseSpec(data_container=bytes, media_type="image/*",
                                  description="the image bytes", generate_examples=False),
                401: ResponseSpec(data_container=ErrorResponse, description="error"),
                404: ResponseSpec(data_container=ErrorResponse, description="error"),
                503: ResponseSpec(data_container=ErrorResponse, description="error")})
async def get_output(request: Request[Any, Any, Any], prediction_id: FromPath[str],
                     n: Annotated[str, Parameter(
                         description="the output's index in `outputs`, 0-based",
                         schema_extra={"pattern": "^[0-9]+$"})],
                     api: ApiDep) -> Response[Any]:
    # A string in the path, so a bad one is this route's 404 after the key check (an
    # int parameter would make "/outputs/x" no route at all, before any guard).
    index = int(n) if n.isascii() and n.isdigit() and len(n) <= 3 else -1
    missing = error_response(404, f"no output {n[:8]} of prediction {prediction_id[:64]}")
    try:
        pred, _attempts = await api.service.get(prediction_id, principal_of(request))
    except NotFound:
        return error_response(404, f"no prediction {prediction_id[:64]}")
    outputs = pred.outputs or []
    store = api.output_store
    # Only what the row says was kept: never a name built from the request alone.
    if store is None or not 0 <= index < len(outputs) or (
            outputs[index].split("?", 1)[0] != output_path(pred.id, index)):
        return missing
    try:
        blob = await store.open(pred.id, index)
    except StoreError:
        return error_response(503, "the output store cannot be read now; retry shortly",
                              headers={"Retry-After": "5"})
    if blob is None:
        return missing
    return Stream(blob.chunks, media_type=blob.content_type, headers={
        "Content-Length": str(blob.size),
        "Cache-Control": "private, max-age=3600",
        "X-Content-Type-Options": "nosniff",
        "X-Flux-Prediction-Id": pred.id,
    })
