"""Read timeouts for clients: uvicorn's HTTP protocol with a header and a body deadline.

uvicorn (0.3x-0.5x) has ``timeout_keep_alive`` (idle time *between* requests,
reset by every byte received) and nothing while a request arrives: a
connection that sends one header line every few seconds, or never finishes its
body, is held open forever (slowloris). ``h11_max_incomplete_event_size``
bounds the header's size, not its time, and ``limit_concurrency`` answers 503
only once headers are complete. An ASGI middleware cannot help: the app is
called after the headers are parsed. So the timers live in the protocol:

* header timeout: the complete request head must arrive within
  ``header_timeout_s`` of the connection opening (first request) or of the
  request's first byte (later requests on a kept-alive connection; the idle
  wait before that byte is ``timeout_keep_alive``'s). It is not reset by
  progress, so trickling lines does not help.
* body timeout: the longest pause between two reads of a request body (as
  nginx's ``client_body_timeout``); a body that keeps moving may take as long
  as it needs (its size is capped by ``max_body_bytes``). Time the server
  itself is not reading (flow control paused because the app has not consumed
  what it has, or a ``100-continue`` not yet sent) is not the client's and is
  not counted.

On expiry the client gets ``408 Request Timeout`` (with ``connection: close``)
when no response has started, then the connection is closed; a connection that
sent nothing at all is closed without an answer. The running app sees
``http.disconnect``.

This subclasses uvicorn's httptools protocol (the one ``uvicorn[standard]``
runs by default), so parsing and everything else stay uvicorn's; the hooks are
the parser callbacks it already has.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

_Phase = Literal["idle", "headers", "body"]


class ClientTimeoutProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a header and a body read timeout (class attributes;
    :func:`protocol_class` makes a subclass with the configured values)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: _Phase = "idle"
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._began = False  # bytes of the current request have arrived

    # -- timer ---------------------------------------------------------------

    def _arm(self, phase: _Phase, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.time() + seconds
        self._timer = self.loop.call_at(self._deadline, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = "idle"

    def _expired(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._phase == "body":
            if self._server_is_waiting():  # not the client's fault: wait another period
                self._arm("body", self.body_timeout_s)
                return
            if self.loop.time() < self._deadline:  # progress since the timer was set
                self._timer = self.loop.call_at(self._deadline, self._expired)
                return
            self._time_out("the request body stalled for more than "
                           f"{self.body_timeout_s:g}s")
        elif self._phase == "headers":
            self._time_out(f"the request headers took longer than {self.header_timeout_s:g}s")

    def _server_is_waiting(self) -> bool:
        cycle = self.cycle
        return bool(self.flow is not None and self.flow.read_paused) or bool(
            cycle is not None and cycle.waiting_for_100_continue)

    def _time_out(self, why: str) -> None:
        phase = self._phase
        self._phase = "idle"
        client = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
        self.logger.info("%sclosing a slow client: %s", client, why)
        cycle = self.cycle if phase == "body" else None
        started = cycle is not None and cycle.response_started
        if cycle is not None:
            cycle.disconnected = True  # the app's receive() answers http.disconnect
            cycle.message_event.set()
        if not started and (phase == "body" or self._began):
            self._send_408(why)
        self.transport.close()

    def _send_408(self, why: str) -> None:
        body = f"Request Timeout: {why}".encode("ascii")
        head = [STATUS_LINE[408]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend([
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n",
            b"\r\n",
            body,
        ])
        self.transport.write(b"".join(head))

    # -- uvicorn's hooks -------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers", self.header_timeout_s)  # the first request: from connecting

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        super().handle_websocket_upgrade()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began = True
        if self._phase != "headers":  # a later request: from its first byte
            self._arm("headers", self.header_timeout_s)

    def on_headers_complete(self) -> None:
        upgrade = bool(self.parser.should_upgrade() and self._should_upgrade())
        super().on_headers_complete()
        self._began = False
        if upgrade:
            self._disarm()
        else:
            self._arm("body", self.body_timeout_s)  # on_message_complete ends it

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._phase == "body":  # progress: the pause starts again now
            self._deadline = self.loop.time() + self.body_timeout_s

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._phase == "body":
            self._disarm()


def protocol_class(*, header_timeout_s: float, body_timeout_s: float) -> type[HttpToolsProtocol]:
    """A :class:`ClientTimeoutProtocol` with these timeouts, for ``uvicorn.run(http=...)``."""
    return type("ClientTimeoutProtocol", (ClientTimeoutProtocol,), {
        "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})
