"""Slow clients are cut: a real `flux-proxy serve` on 127.0.0.1 with short read timeouts.

`client_header_timeout_s` bounds the time to send a request's complete headers
(from connecting, or from the request's first byte on a kept-alive connection;
trickling lines does not extend it); `client_body_timeout_s` bounds a pause in
the body. Each cut answers 408 where a request had begun, then closes. Normal
requests, idle keep-alive connections and bodies that keep moving are untouched.
(proxy/client_timeouts.py)
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.client_timeouts import ClientTimeoutProtocol, protocol_class

HEADER_S = 2.0
BODY_S = 1.5
SLACK_S = 1.5  # scheduling, the server's loop, the test's own reads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_", "LOCAL_"))}
    env.update({
        "FLUX_PROXY_HOST": "127.0.0.1",
        "FLUX_PROXY_PORT": str(port),
        "FLUX_PROXY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'proxy.db'}",
        "FLUX_PROXY_AUTH_ENABLED": "false",
        "FLUX_PROXY_CLIENT_HEADER_TIMEOUT_S": str(HEADER_S),
        "FLUX_PROXY_CLIENT_BODY_TIMEOUT_S": str(BODY_S),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    })
    log = (tmp / "serve.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve"], cwd=tmp, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "flux-proxy serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield "127.0.0.1", port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.settimeout(10)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            got = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not got:
            return data
        data += got


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length (all the proxy's small answers have one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        assert got, f"closed mid-response: {data!r}"
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# --------------------------------------------------------------------------- still working


def test_normal_requests_and_idle_keep_alive_are_untouched(proxy: tuple[str, int]) -> None:
    with _connect(proxy) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _status(_read_response(sock)) == 200
        # Idle longer than the header timeout (but within keep-alive, 5 s): the
        # header clock starts at the next request's first byte, not before.
        time.sleep(HEADER_S + 0.5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _status(_read_response(sock)) == 200
    body = b'{"prompt": "a cat", "size": "1x1"}'
    r = httpx.post(f"http://{proxy[0]}:{proxy[1]}/v1/predictions", content=body,
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 422  # answered (a validation error), not cut


def test_a_body_that_keeps_moving_is_not_cut(proxy: tuple[str, int]) -> None:
    body = b'{"prompt": "' + b"a" * 20 + b'", "size": "1x1"}'
    pieces = [body[i:i + 10] for i in range(0, len(body), 10)]
    with _connect(proxy) as sock:
        sock.sendall(b"POST /v1/predictions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                     b"application/json\r\ncontent-length: " + str(len(body)).encode()
                     + b"\r\n\r\n")
        started = time.monotonic()
        for piece in pieces:  # 5 pieces, BODY_S / 2 apart: longer than 2 x BODY_S in all
            time.sleep(BODY_S / 2)
            sock.sendall(piece)
        assert time.monotonic() - started > 2 * BODY_S
        assert _status(_read_response(sock)) == 422


# --------------------------------------------------------------------------- cut


def test_headers_trickled_one_line_a_second_are_cut(proxy: tuple[str, int]) -> None:
    with _connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed_at = None
        for i in range(int(HEADER_S + SLACK_S) + 3):
            time.sleep(1.0)
            try:
                sock.sendall(f"x-line-{i}: still coming\r\n".encode())
            except OSError:  # closed (reset) under us
                closed_at = time.monotonic()
                break
            if _is_closed_now(sock):
                closed_at = time.monotonic()
                break
        assert closed_at is not None, "a trickling client stayed connected"
        assert HEADER_S - 0.1 <= closed_at - started <= HEADER_S + SLACK_S + 1.0


def test_trickled_headers_get_408(proxy: tuple[str, int]) -> None:
    with _connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nx-a: 1\r\n")
        answer = _read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer.lower()
    assert HEADER_S - 0.1 <= elapsed <= HEADER_S + SLACK_S


def test_a_connection_that_sends_nothing_is_closed(proxy: tuple[str, int]) -> None:
    with _connect(proxy) as sock:
        started = time.monotonic()
        answer = _read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer == b""  # nothing was asked: nothing to answer
    assert HEADER_S - 0.1 <= elapsed <= HEADER_S + SLACK_S


def test_a_stalled_body_is_cut_with_408(proxy: tuple[str, int]) -> None:
    with _connect(proxy) as sock:
        sock.sendall(b"POST /v1/predictions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                     b"application/json\r\ncontent-length: 1000\r\n\r\n{\"prompt\": ")
        started = time.monotonic()
        answer = _read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"body stalled" in answer
    assert BODY_S - 0.1 <= elapsed <= BODY_S + SLACK_S


def test_many_slow_clients_are_all_closed_in_time(proxy: tuple[str, int]) -> None:
    """The issue's 2,000 trickling connections, scaled to 200."""
    socks = [_connect(proxy) for _ in range(200)]
    started = time.monotonic()
    try:
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
        stop = threading.Event()

        def trickle() -> None:
            i = 0
            while not stop.wait(0.5):
                i += 1
                for s in socks:
                    with contextlib.suppress(OSError):  # already closed by the server
                        s.sendall(f"x-{i}: y\r\n".encode())

        feeder = threading.Thread(target=trickle, daemon=True)
        feeder.start()
        time.sleep(HEADER_S + SLACK_S)
        stop.set()
        feeder.join(timeout=5)
        still_open = [s for s in socks if not _is_closed_now(s)]
        assert not still_open, f"{len(still_open)} of 200 trickling clients still connected " \
            f"after {time.monotonic() - started:.1f}s"
    finally:
        for s in socks:
            s.close()


def _is_closed_now(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        while True:
            got = sock.recv(65536)  # the 408, then EOF
            if not got:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


# --------------------------------------------------------------------------- wiring


def test_protocol_class_carries_the_settings() -> None:
    cls = protocol_class(header_timeout_s=3.0, body_timeout_s=4.0)
    assert issubclass(cls, ClientTimeoutProtocol)
    assert (cls.header_timeout_s, cls.body_timeout_s) == (3.0, 4.0)
    assert (ClientTimeoutProtocol.header_timeout_s, ClientTimeoutProtocol.body_timeout_s) == (
        10.0, 30.0)
