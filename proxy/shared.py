"""The Redis that several proxy processes and replicas share (`redis_url`).

What lives there is small and short-lived: per-key rate-limit state
(proxy/accounts/ratelimit.py), and which providers some process found broken or
rate-limited (proxy/routing/sharing.py). Every key is under one prefix, the
URL's `key_prefix` query parameter (default ``flux-proxy:``), so deployments
and test runs can share one Redis:
``redis://127.0.0.1:6379/0?key_prefix=flux-staging:``. Each call is bounded by
short timeouts: a slow or absent Redis degrades the proxy to per-process state,
it never stalls a request.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

__all__ = ["DEFAULT_PREFIX", "RedisError", "SharedRedis", "open_shared", "parse_redis_url"]

DEFAULT_PREFIX = "flux-proxy:"
CONNECT_TIMEOUT_S = 1.0
CALL_TIMEOUT_S = 0.5  # per command; a request's rate check waits no longer than this


def parse_redis_url(url: str) -> tuple[str, str]:
    """(the URL for redis-py, the key prefix) from `redis_url`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("redis", "rediss", "unix"):
        got = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise ValueError(f"redis_url must be a redis://, rediss:// or unix:// URL, not {got}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "key_prefix"), DEFAULT_PREFIX)
    rest = urlencode([(k, v) for k, v in query if k != "key_prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


class SharedRedis:
    """One asyncio Redis client (a connection pool) and the key prefix."""

    def __init__(self, client: aioredis.Redis, prefix: str, safe_url: str) -> None:
        self.client = client
        self.prefix = prefix
        self.safe_url = safe_url

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def aclose(self) -> None:
        await self.client.aclose()


def _safe(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_shared(url: str) -> SharedRedis:
    """A client for `url` (connections are made on first use; a bad scheme is a
    ValueError here)."""
    client_url, prefix = parse_redis_url(url)
    client = aioredis.Redis.from_url(
        client_url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CALL_TIMEOUT_S,
        health_check_interval=30, decode_responses=True)
    return SharedRedis(client, prefix, _safe(client_url))
