"""The little raw-ASGI plumbing the simulators need: read, answer, wait, drop.

Raw ASGI (no framework) keeps the simulator's own per-request cost far below the
proxy's, so a benchmark of the proxy against it measures the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

import msgspec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WaitOutcome = Literal["elapsed", "disconnect", "closing"]

MAX_BODY = 32 * 1024 * 1024
JSON = b"application/json"

_encode = msgspec.json.Encoder().encode


class BodyTooLarge(Exception):
    pass


class SimulatedDrop(Exception):
    """Raised to break a response off when the server gives no transport to close."""


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client left first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    raw_headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
    ]
    if headers:
        raw_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def respond_json(
    send: Send, status: int, obj: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await respond(send, status, _encode(obj), JSON, headers)


async def until_disconnect(receive: Receive) -> None:
    """Return once the client has gone (call only after the body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def wait(receive: Receive, seconds: float, closing: asyncio.Event) -> WaitOutcome:
    """Sleep `seconds`, cut short by the client leaving or the server closing.
    Cancellation-safe: every helper task is cancelled on the way out."""
    if seconds <= 0:
        return "elapsed"
    timer = asyncio.ensure_future(asyncio.sleep(seconds))
    gone = asyncio.ensure_future(until_disconnect(receive))
    close = asyncio.ensure_future(closing.wait())
    tasks = (timer, gone, close)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if close.done() and not close.cancelled():
        return "closing"
    if gone.done() and not gone.cancelled():
        return "disconnect"
    return "elapsed"


async def drop_connection(send: Send, receive: Receive) -> None:
    """Close the connection without sending a byte of response.

    uvicorn hands the app its RequestResponseCycle's bound `send`, whose owner holds
    the asyncio transport: aborting it gives the client a connection-level error
    (httpx: RemoteProtocolError "Server disconnected without sending a response").
    Elsewhere, start a response that promises a body and break it off, which any
    server turns into a truncated response.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()
        # Let the server see the loss, so that it does not answer 500 itself.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until_disconnect(receive), timeout=1.0)
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", JSON), (b"content-length", b"1024")],
        }
    )
    raise SimulatedDrop("simulated dropped connection")
