"""Normalise a completed upstream job into what the client gets.

Outputs become URLs, or self-describing data URIs when the client asked for
base64 (downloaded here when the upstream cannot encode); NSFW flags become
exactly one bool per output.
"""

from __future__ import annotations

import asyncio

from common import media
from providers.base import GenerationRequest, MalformedResponse, Provider, UpstreamJob


async def _ensure_data_uri(provider: Provider, url: str) -> str:
    if url.startswith("data:"):
        return url
    try:
        data, content_type = await provider.download(url)
        info = media.inspect_image(data)
    except media.MediaError as exc:
        raise MalformedResponse(
            f"output could not be fetched as an image: {exc.reason}", provider=provider.name
        ) from exc
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared.startswith("image/") and declared.removeprefix("image/") not in (
        info.format,
        "jpg" if info.format == "jpeg" else info.format,
    ):
        raise MalformedResponse(
            f"output declared {declared} but is {info.mime}", provider=provider.name
        )
    return media.to_data_uri(data, info.format)


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
