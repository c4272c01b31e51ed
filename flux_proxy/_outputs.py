"""Writing a prediction's outputs: `<prediction id>-<n>.<ext>` in a folder.

Outputs are data URIs (decoded here) or absolute URLs. A URL on the proxy's own
origin (kept outputs, /v1/predictions/{id}/outputs/{n}) needs the client key; any
other host (a provider's asset URL) gets no Authorization header, so the key never
leaves for a third party.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from flux_proxy._inputs import decode_data_uri, extension

if TYPE_CHECKING:
    import httpx

    from flux_proxy._types import Prediction

# (content type, bytes) of one output URL.
Fetch = Callable[[str], tuple[str | None, bytes]]
AsyncFetch = Callable[[str], Awaitable[tuple[str | None, bytes]]]


def same_origin(url: str, base_url: str | None) -> bool:
    if not base_url:
        return False
    a, b = urlsplit(url), urlsplit(base_url)
    return (a.scheme.lower(), a.netloc.lower()) == (b.scheme.lower(), b.netloc.lower())


def auth_headers(url: str, base_url: str | None, api_key: str | None) -> dict[str, str]:
    if api_key and same_origin(url, base_url):
        return {"Authorization": f"Bearer {api_key}"}
    return {}


def _write(directory: Path, pred_id: str, n: int, content_type: str | None,
           data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{pred_id}-{n}.{extension(content_type, data)}"
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    tmp.replace(path)  # a reader never sees half an image
    return path


def save_with(pred: Prediction, directory: Path, fetch: Fetch) -> list[Path]:
    paths = []
    for n, out in enumerate(pred.outputs):
        ctype, data = decode_data_uri(out) if out[:5].lower() == "data:" else fetch(out)
        paths.append(_write(directory, pred.id, n, ctype, data))
    return paths


async def save_with_async(pred: Prediction, directory: Path, fetch: AsyncFetch) -> list[Path]:
    paths = []
    for n, out in enumerate(pred.outputs):
        ctype, data = decode_data_uri(out) if out[:5].lower() == "data:" else await fetch(out)
        paths.append(_write(directory, pred.id, n, ctype, data))
    return paths


def checked(response: httpx.Response) -> tuple[str | None, bytes]:
    from flux_proxy._errors import error_from_response

    if response.status_code != 200:
        raise error_from_response(response)
    return response.headers.get("content-type"), response.content


def save_standalone(pred: Prediction, directory: Path, *, base_url: str | None,
                    api_key: str | None, timeout: float = 60.0) -> list[Path]:
    """Save with a short-lived connection of its own (a prediction from an async
    client, or built by hand)."""
    import httpx

    with httpx.Client(timeout=timeout, follow_redirects=True) as http:
        def fetch(url: str) -> tuple[str | None, bytes]:
            return checked(http.get(url, headers=auth_headers(url, base_url, api_key)))

        return save_with(pred, directory, fetch)
