"""OpenAI's images API under /v1 (``OpenAI(base_url=".../v1", api_key=<proxy key>)``):
a thin translator onto the one schema and `admit`, like every surface.

``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart:
image-to-image, or inpainting with a mask) submit one prediction in sync mode and wait
for it (``sync_timeout_s``); the answer is OpenAI's ``{"created", "data": [{"url"} |
{"b64_json"}], ...}`` plus the X-Flux-* headers naming the prediction, which is the
same one ``GET /v1/predictions/{id}`` shows to the same key. ``GET /v1/models/{model}``
is the SDK's ``models.retrieve`` (``models.list`` is ``GET /v1/models``, system.py).

OpenAI parameters are mapped (n -> num_images, "WxH" -> "W*H", response_format ->
enable_base64_output), harmless ones ignored, and those whose meaning FLUX cannot
honour refused with a 400 naming them; FLUX's own parameters come as extra body fields
(the SDK's ``extra_body``). Errors: proxy/api/openai_errors.py.
"""

from __future__ import annotations

import calendar
from typing import Any

import msgspec
from litestar import HttpMethod, Request, Response, Router, get, post, route
from litestar.params import FromPath
from pydantic import ValidationError

from proxy.accounts.auth import require_key
from proxy.api.deps import Api, ApiDep
from proxy.api.openai_edits import FormError, edit_images, read_form
from proxy.api.openai_errors import (
    EXCEPTION_HANDLERS,
    NO_RETRY,
    SERVER,
    bad_param,
    failure_error,
    openai_error,
    refusal_error,
)
from proxy.api.render import base_url, output_urls
from proxy.api.submitting import (
    Refusal,
    admit,
    check_names,
    finish_sync,
    from_validation_error,
    prediction_headers,
)
from proxy.api.system import MODEL_CREATED, MODEL_OWNED_BY
from proxy.lifecycle.run import Run
from proxy.schema import GenerateRequest

DEFAULT_MODEL = "flux-dev"
DEFAULT_SIZE = "1024*1024"  # size "auto" (or none) of a generation
DEFAULT_FORMAT = "png"  # what OpenAI's image models return when output_format is not sent
OUTPUT_FORMATS = ("png", "jpeg", "webp")

# FLUX parameters a caller adds through the SDK's `extra_body`, as the unified schema
# names them.
FLUX_PARAMS = frozenset({"strength", "num_inference_steps", "guidance_scale", "seed",
                         "enable_safety_checker", "providers"})
MAPPED = frozenset({"model", "prompt", "n", "size", "response_format", "output_format"})
# Accepted and ignored whatever their value: they change nothing a FLUX image shows.
IGNORED = frozenset({"user", "safety_identifier", "output_compression"})
# Accepted with these values (or null); any other value is a 400 naming the parameter,
# because ignoring it would silently give the caller something other than asked.
CONDITIONAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "quality": (("auto", "standard"), "for more detail set num_inference_steps "
                "(extra_body)"),
    "background": (("auto", "opaque"), "FLUX images are opaque"),
    "moderation": (("auto",), "set enable_safety_checker (extra_body)"),
    "style": ((), "describe the style in the prompt"),
    "stream": ((False,), "flux-proxy answers when the images are ready"),
    "partial_images": ((0,), "there is no streaming"),
    "input_fidelity": ((), "set strength (extra_body): lower keeps more of the image"),
    "complexity": ((), "not a FLUX parameter"),
    "frame_count": ((), "FLUX makes still images"),
    "frame_duration_ms": ((), "FLUX makes still images"),
    "svg": ((), "FLUX makes raster images"),
}
KNOWN = MAPPED | IGNORED | FLUX_PARAMS | frozenset(CONDITIONAL)


def to_request(body: dict[str, Any], api: Api, *, image: str | None = None,
               mask: str | None = None, auto_size: str | None = None
               ) -> GenerateRequest | Response[Any]:
    """OpenAI's parameters as the unified request (sync), or the 400 to answer."""
    if "prompt" not in body:
        return bad_param("prompt", "Missing required parameter: 'prompt'",
                         code="missing_required_parameter")
    for name, value in body.items():
        if name not in KNOWN:
            return bad_param(name, f"Unrecognized request argument supplied: {name}",
                             code="unknown_parameter")
        if name in CONDITIONAL and value is not None and value not in CONDITIONAL[name][0]:
            accepted, hint = CONDITIONAL[name]
            allowed = f" (accepted: {', '.join(map(str, accepted))})" if accepted else ""
            return bad_param(name, f"'{name}'={value!r} is not supported by flux-proxy"
                             f"{allowed}: {hint}", code="unsupported_value")
    models = api.settings.models
    model = body.get("model")
    if model is None:
        model = DEFAULT_MODEL if DEFAULT_MODEL in models else models[0]
    elif model not in models:
        # OpenAI's images API answers an unknown model with a 400 naming `model` (not
        # the 404 of its chat API); an app that names dall-e-* or gpt-image-* gets it.
        return bad_param("model", f"Invalid 'model': model {model!r} not found; this proxy "
                         f"serves {', '.join(models)}", code="model_not_found")
    n = body.get("n")
    if n is not None and (type(n) is not int or not 1 <= n <= 4):
        return bad_param("n", f"Invalid 'n': {n!r}; FLUX makes 1 to 4 images per request")
    size = body.get("size")
    if size is None or size == "auto":
        size = auto_size or DEFAULT_SIZE
    response_format = body.get("response_format")
    if response_format not in (None, "url", "b64_json"):
        return bad_param("response_format", f"Invalid 'response_format': {response_format!r};"
                         " use 'url' or 'b64_json'")
    output_format = body.get("output_format") or DEFAULT_FORMAT
    if output_format not in OUTPUT_FORMATS:
        return bad_param("output_format", f"Invalid 'output_format': {output_format!r}; "
                         f"use one of {', '.join(OUTPUT_FORMATS)}")
    fields: dict[str, Any] = {
        "model": model, "prompt": body.get("prompt"), "size": size,
        "num_images": n or 1, "output_format": output_format,
        "enable_base64_output": response_format == "b64_json", "enable_sync_mode": True,
        **{k: v for k, v in body.items() if k in FLUX_PARAMS and v is not None},
    }
    if image is not None:
        fields.update(image=image, mask_image=mask)
    try:
        req = GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        return refusal_error(from_validation_error(exc))
    refused = check_names(req, models, list(api.provider_settings))
    return refusal_error(refused) if refused else req


async def answer(request: Request[Any, Any, Any], api: Api, req: GenerateRequest
                 ) -> Response[Any]:
    """Submit, wait for the terminal state, answer as OpenAI does."""
    run = await admit(request, api, req, surface="openai")
    if isinstance(run, Refusal):
        return refusal_error(run)
    finished = await finish_sync(api, run)
    headers = prediction_headers(run)
    pred = run.pred
    if not finished:
        # A retry would submit (and pay for) a second prediction: the caller fetches
        # this one instead, by the id in the message and the X-Flux-Prediction-Id header.
        return openai_error(
            504, f"The images were not ready within {api.settings.sync_timeout_s:g}s; the "
            f"prediction {pred.id} is still running: GET /v1/predictions/{pred.id} "
            "(with the same key) returns it when done.", type_=SERVER, code="timeout",
            headers={**headers, **NO_RETRY})
    if pred.status != "completed":
        return failure_error(pred, headers)
    return Response(images_body(run, req, base_url(request, api.settings)), status_code=200,
                    headers=headers)


def images_body(run: Run, req: GenerateRequest, base: str = "") -> dict[str, Any]:
    pred = run.pred
    outputs = output_urls(pred.outputs, base)
    fmt: str = req.output_format
    if req.enable_base64_output:
        data = [{"b64_json": _plain_base64(o)} for o in outputs]
        if outputs and outputs[0].startswith("data:image/"):  # the real type, sniffed
            fmt = outputs[0][11:outputs[0].find(";")] or fmt
    else:
        data = [{"url": o} for o in outputs]
    created = pred.completed_at or pred.created_at
    # No `usage`: FLUX has no tokens, and inventing counts would mislead; the cost is
    # in the X-Flux-Cost-USD header and on the prediction.
    return {"created": calendar.timegm(created.utctimetuple()), "data": data,
            "output_format": fmt, "size": req.size.replace("*", "x")}


def _plain_base64(output: str) -> str:
    """OpenAI's b64_json is bare base64: the data URI's payload."""
    return output.partition(",")[2] if output.startswith("data:") else output


@post("/images/generations", status_code=200, summary="OpenAI: create images")
async def create_images(request: Request[Any, Any, Any], api: ApiDep) -> Response[Any]:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        return openai_error(400, f"We could not parse the JSON body of your request: {exc}",
                            code="invalid_json")
    if not isinstance(body, dict):
        return openai_error(400, "The request body must be a JSON object", code="invalid_json")
    req = to_request(body, api)
    return req if isinstance(req, Response) else await answer(request, api, req)


@post("/images/edits", status_code=200,
      summary="OpenAI: edit an image (image-to-image; inpainting with a mask)")
async def edit_image(request: Request[Any, Any, Any], api: ApiDep) -> Response[Any]:
    try:
        fields, image, mask = await read_form(request)
        images = await edit_images(image, mask)
    except FormError as exc:
        return bad_param(exc.param, exc.message, code=exc.code)
    del image, mask
    req = to_request(fields, api, image=images.image, mask=images.mask,
                     auto_size=images.auto_size)
    return req if isinstance(req, Response) else await answer(request, api, req)


@post("/images/variations", status_code=400, summary="OpenAI: variations (not supported)")
async def create_variation() -> Response[Any]:
    return bad_param("image", "Image variations are not supported by flux-proxy: use "
                     "/v1/images/edits with a prompt (image-to-image)",
                     code="unsupported_endpoint")


@get("/models/{model:str}", summary="OpenAI: one model (the SDK's models.retrieve)")
async def retrieve_model(model: FromPath[str], api: ApiDep) -> Response[Any]:
    if model not in api.settings.models:
        return openai_error(404, f"The model '{model}' does not exist", param="model",
                            code="model_not_found")
    return Response({"id": model, "object": "model", "created": MODEL_CREATED,
                     "owned_by": MODEL_OWNED_BY})


_OTHER_METHODS = [HttpMethod.GET, HttpMethod.PUT, HttpMethod.PATCH, HttpMethod.DELETE]
_IMAGE_PATHS = ["/images/generations", "/images/edits", "/images/variations"]


# Litestar answers a wrong method or path before any route's layer applies, in the
# native shape; these keep them in OpenAI's under /v1/images.
@route(_IMAGE_PATHS, http_method=_OTHER_METHODS, status_code=405, include_in_schema=False)
async def wrong_method(request: Request[Any, Any, Any]) -> Response[Any]:
    return openai_error(405, f"{request.method} is not allowed on {request.url.path}: use POST",
                        code="method_not_allowed", headers={"Allow": "POST"})


@route("/images/{rest:path}", http_method=[HttpMethod.POST, *_OTHER_METHODS],
       status_code=404, include_in_schema=False)
async def unknown_images_route(request: Request[Any, Any, Any]) -> Response[Any]:
    return openai_error(404, f"Unknown request URL: {request.method} {request.url.path}",
                        code="unknown_url")


# One layer for every OpenAI route: the key guard, and errors (the guard's 401 too)
# in OpenAI's shape.
OPENAI_ROUTER = Router(
    path="/v1",
    route_handlers=[create_images, edit_image, create_variation, retrieve_model, wrong_method,
                    unknown_images_route],
    guards=[require_key],
    exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
    tags=["openai"],
)

HANDLERS: list[Any] = [OPENAI_ROUTER]
