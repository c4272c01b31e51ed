"""A loopback webhook receiver for tests: scripted answers, every POST kept."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ._serve import serving_app


@dataclass
class Receiver:
    """A loopback webhook receiver: answers `codes` in turn (then 200), keeps each POST."""

    codes: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the sender died mid-body (a SIGKILLed replica): nothing came
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        with self.lock:
            code = self.codes.pop(0) if self.codes else 200
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            self.received.append((headers, body, code))
        await send({"type": "http.response.start", "status": code, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for h, b, code in self.received if code == 200]

    async def wait(self, cond: Callable[[Receiver], bool], timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond(self):
            assert time.monotonic() < deadline, f"receiver got {len(self.received)} POSTs"
            await asyncio.sleep(0.05)


@contextmanager
def receiving() -> Iterator[Receiver]:
    hook = Receiver()
    with serving_app(hook, "receiver") as url:
        hook.url = f"{url}/hooks/flux"
        yield hook
