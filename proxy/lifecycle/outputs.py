"""Normalise a completed upstream job into what the client gets.

Outputs become URLs, or self-describing data URIs when the client asked for
base64 (downloaded here when the upstream cannot encode); NSFW flags become
exactly one bool per output.

Memory (common/media/budget.py): a downloaded output stays counted in the
process's download budget until its data URI is built, and checking and
encoding it reserve their working memory from the decode budget first (its
pixels, or the text of the URI, whichever is larger), so concurrent base64
predictions wait for memory instead of each taking what it likes. The bytes go
to the worker thread, and only there: the raw image is freed before the text is
turned into the final string (two copies of the text at the peak, not four).
"""

from __future__ import annotations

import asyncio

from common import media
from providers.base import (
    GenerationRequest,
    MalformedResponse,
    Provider,
    UpstreamJob,
    UpstreamUnavailable,
)


def _check_and_encode(box: list[bytes], fmt: str) -> str:
    """In a worker thread: fully decode the image, then build its data URI. ``box``
    holds the only reference to the bytes, so they are freed before the final copy."""
    data = box.pop()
    media.inspect_image(data)
    text = media.data_uri_bytes(data, fmt)
    del data
    return text.decode("ascii")


async def _ensure_data_uri(provider: Provider, url: str) -> str:
    if url.startswith("data:"):
        return url
    # The only reference to the bytes, emptied on every way out: an exception's
    # traceback keeps this frame alive, and must not keep the image with it after
    # its reservation is returned.
    box: list[bytes] = []
    try:
        with media.holding():  # the body stays counted until the URI is built
            data, content_type = await provider.download(url)
            box.append(data)
            del data
            fmt, width, height = media.read_header(box[0])
            _check_declared(provider, content_type, fmt)
            cost = max(media.decode_cost(fmt, width, height),
                       2 * media.data_uri_length(len(box[0]), fmt))
            return await media.budget.decoding().run(
                cost, _check_and_encode, box, fmt, what="decoding the output",
                wait_s=provider.settings.download_timeout_s)
    except media.BudgetWait as exc:
        raise UpstreamUnavailable(f"{provider.name}: output not encoded: {exc.reason}",
                                  provider=provider.name) from exc
    except media.MediaError as exc:
        raise MalformedResponse(
            f"output could not be fetched as an image: {exc.reason}", provider=provider.name
        ) from exc
    finally:
        box.clear()


def _check_declared(provider: Provider, content_type: str | None, fmt: str) -> None:
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared.startswith("image/") and declared.removeprefix("image/") not in (
        fmt,
        "jpg" if fmt == "jpeg" else fmt,
    ):
        raise MalformedResponse(
            f"output declared {declared} but is {media.MIME_TYPES[fmt]}", provider=provider.name
        )


async def normalize(
    provider: Provider, req: GenerationRequest, job: UpstreamJob
) -> tuple[list[str], list[bool]]:
    outputs = [o for o in job.outputs if isinstance(o, str) and o]
    if not outputs:
        raise MalformedResponse("upstream completed with no outputs", provider=provider.name)
    for out in outputs:
        if not out.startswith(("http://", "https://", "data:image/")):
            raise MalformedResponse("upstream returned an output that is not a URL",
                                    provider=provider.name)
    if req.enable_base64_output:
        outputs = list(await asyncio.gather(*(_ensure_data_uri(provider, o) for o in outputs)))
    flags = list(job.has_nsfw_contents or [])
    # Upstreams without flags (VibeDream refuses unsafe prompts instead) and short
    # lists count as "not flagged"; extra flags are dropped.
    flags = [bool(f) for f in flags[: len(outputs)]] + [False] * (len(outputs) - len(flags))
    return outputs, flags
