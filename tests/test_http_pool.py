"""The upstream client's pool (providers/_http.py LeanConnectionPool) and URL cache,
against a real loopback HTTP/1.1 server: keep-alive expiry, server-closed
connections, the connection limit, and URL merging as httpx does it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpcore
import httpx
import pytest
from pydantic import SecretStr

from providers import _http, _pool, _urls
from providers.base import ProviderSettings, UpstreamUnavailable


class Upstream:
    """Answers every request with `{"ok": true}` and keeps the connection (unless
    `close_after_answer`), after `delay_s`. Counts connections and paths."""

    def __init__(self) -> None:
        self.connections = 0
        self.paths: list[str] = []
        self.delay_s = 0.0
        self.close_after_answer = False
        self.open = 0
        self.peak_open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.paths.append(head.split(b" ")[1].decode())
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                body = b'{"ok": true}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                if self.close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    up = Upstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield up, f"http://127.0.0.1:{port}"
        server.close()


def settings(base_url: str, **kw: object) -> ProviderSettings:
    return ProviderSettings(base_url=base_url, api_key=SecretStr("k"), **kw)  # type: ignore[arg-type]


async def get(client: httpx.AsyncClient, urls: _urls.URLCache, url: str) -> dict[str, object]:
    return await _http.call(client, "GET", url, provider="p", op="poll", urls=urls, total_s=5)


def pool_of(client: httpx.AsyncClient) -> httpcore.AsyncConnectionPool:
    return client._transport._pool  # type: ignore[attr-defined]


async def test_lean_pool_is_the_default_and_can_be_switched_off(upstream: tuple[Upstream, str]):
    _, base = upstream
    async with _http.build_client(settings(base)) as c:
        assert type(pool_of(c)) is _pool.LeanConnectionPool
    async with _http.build_client(settings(base, lean_pool=False)) as c:
        assert type(pool_of(c)) is httpcore.AsyncConnectionPool
    async with _http.build_asset_client(settings(base)) as c:
        assert type(pool_of(c)) is _pool.LeanConnectionPool


async def test_reuses_a_kept_alive_connection(upstream: tuple[Upstream, str]):
    up, base = upstream
    async with _http.build_client(settings(base)) as c:
        urls = _urls.URLCache(c.base_url)
        for _ in range(5):
            assert await get(c, urls, "/a") == {"ok": True}
    assert up.connections == 1


async def test_never_reuses_a_connection_idle_past_keepalive_expiry(
        upstream: tuple[Upstream, str]):
    up, base = upstream
    async with _http.build_client(settings(base, keepalive_expiry_s=0.2)) as c:
        urls = _urls.URLCache(c.base_url)
        await get(c, urls, "/a")
        await asyncio.sleep(0.3)
        await get(c, urls, "/a")  # within SWEEP_S of the first pass: checked when picked
        assert up.connections == 2
        assert len(pool_of(c).connections) == 1


async def test_a_connection_the_server_closed_is_not_reused(upstream: tuple[Upstream, str]):
    up, base = upstream
    up.close_after_answer = True
    async with _http.build_client(settings(base)) as c:
        urls = _urls.URLCache(c.base_url)
        for _ in range(3):
            await get(c, urls, "/a")
            await asyncio.sleep(0.05)  # the server's close arrives
    assert up.connections == 3


async def test_expired_idle_connections_are_swept(upstream: tuple[Upstream, str]):
    _, base = upstream
    async with _http.build_client(settings(base, keepalive_expiry_s=0.1)) as c:
        urls = _urls.URLCache(c.base_url)
        await asyncio.gather(*(get(c, urls, "/a") for _ in range(5)))
        assert len(pool_of(c).connections) == 5
        await asyncio.sleep(0.2)
        pool_of(c)._swept_at = -1e9  # type: ignore[attr-defined]  # as if SWEEP_S passed
        await get(c, urls, "/a")
        assert len(pool_of(c).connections) == 1


async def test_connection_limit_holds_and_every_waiting_request_is_served(
        upstream: tuple[Upstream, str]):
    up, base = upstream
    up.delay_s = 0.01
    async with _http.build_client(settings(base, max_connections=4)) as c:
        urls = _urls.URLCache(c.base_url)
        results = await asyncio.gather(*(get(c, urls, f"/p/{i}") for i in range(60)))
        assert len(pool_of(c).connections) <= 4
        assert pool_of(c)._requests == []
    assert results == [{"ok": True}] * 60
    assert up.peak_open <= 4
    assert up.connections == 4
    assert sorted(up.paths) == sorted(f"/p/{i}" for i in range(60))


async def test_pool_timeout_is_unavailable(upstream: tuple[Upstream, str]):
    up, base = upstream
    up.delay_s = 0.5
    async with _http.build_client(settings(base, max_connections=1,
                                           connect_timeout_s=0.05)) as c:
        urls = _urls.URLCache(c.base_url)
        slow = asyncio.create_task(get(c, urls, "/slow"))
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamUnavailable, match="PoolTimeout"):
            await get(c, urls, "/b")
        assert await slow == {"ok": True}
        assert await get(c, urls, "/c") == {"ok": True}  # the pool is whole again


async def test_cancelled_waiters_leave_the_pool_whole(upstream: tuple[Upstream, str]):
    up, base = upstream
    up.delay_s = 0.05
    async with _http.build_client(settings(base, max_connections=2)) as c:
        urls = _urls.URLCache(c.base_url)
        tasks = [asyncio.create_task(get(c, urls, "/x")) for _ in range(10)]
        await asyncio.sleep(0.01)
        for t in tasks[4:]:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert done[:4] == [{"ok": True}] * 4
        assert pool_of(c)._requests == []
        assert await get(c, urls, "/y") == {"ok": True}
        assert len(pool_of(c).connections) <= 2


@pytest.mark.parametrize(("base", "url", "expected"), [
    ("http://h:1", "/api/v3/x", "http://h:1/api/v3/x"),
    ("http://h:1/prefix", "/api/v3/x", "http://h:1/prefix/api/v3/x"),
    ("http://h:1/prefix/", "api/v3/x?a=1", "http://h:1/prefix/api/v3/x?a=1"),
    ("http://h:1", "http://other:2/y/z", "http://other:2/y/z"),
])
def test_url_cache_merges_like_httpx(base: str, url: str, expected: str):
    client = httpx.AsyncClient(base_url=base)
    cache = _urls.URLCache(client.base_url)
    assert cache.get(url) == client._merge_url(url) == httpx.URL(expected)
    assert cache.get(url) is cache.get(url)


def test_url_cache_same_origin_and_bound(monkeypatch: pytest.MonkeyPatch):
    cache = _urls.URLCache("https://api.example.com")
    assert cache.same_origin("https://api.example.com/api/v3/predictions/1/result")
    assert not cache.same_origin("https://evil.example.com/x")
    assert not cache.same_origin("https://user:pw@api.example.com/x")
    assert not cache.same_origin("http://api.example.com/x")
    monkeypatch.setattr(_urls, "URL_CACHE_MAX", 3)
    for i in range(10):
        cache.get(f"/p/{i}")
    assert len(cache._urls) <= 3


async def test_a_bad_url_through_the_cache_is_unavailable():
    async with httpx.AsyncClient(base_url="http://h:1") as c:
        with pytest.raises(UpstreamUnavailable, match="failed"):
            await _http.call(c, "GET", "http://[::1", provider="p", op="poll",
                             urls=_urls.URLCache(c.base_url))


def test_env_proxies_still_apply(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    client = _http.build_client(settings("https://api.example.com"))
    assert client._transport_for_url(httpx.URL("https://api.example.com/x")) is not \
        client._transport  # the env proxy's mount, as without the lean pool
    assert type(pool_of(client)) is _pool.LeanConnectionPool
