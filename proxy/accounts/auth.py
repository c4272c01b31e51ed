"""Client API keys: generation, keyed hashing, lookup, guards, per-key rate limits
(the buckets: proxy/accounts/ratelimit.py).

Keys are 256-bit random strings shown once. Only HMAC-SHA256(secret, key) is
stored; the secret is FLUX_PROXY_KEY_SECRET, or else one generated per database
(stored in proxy_meta), so a fresh install needs no set-up. With the env secret
a database dump alone cannot even confirm a key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from common.logging import register_secrets
from proxy.accounts import webhook_secrets
from proxy.accounts.ratelimit import LocalRateLimiter, RateLimiter
from proxy.store.models import ApiKey, utcnow
from proxy.store.repo import Store

KEY_PREFIX = "fpk_"
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
        "h": 3600, "hour": 3600}


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hash_key(key: str, secret: bytes) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def parse_rate(text: str) -> float:
    """'10/s', '600/m', '5/hour' -> requests per second."""
    m = _RATE_RE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"rate {text!r} must look like 10/s, 600/m or 5/h")
    return float(m.group(1)) / _PER[m.group(2)]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a client key, the admin, or anyone (auth switched off)."""

    key: ApiKey | None = None
    admin: bool = False

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None

    @property
    def key_name(self) -> str | None:
        return self.key.name if self.key else None

    @property
    def sees_all(self) -> bool:
        return self.key is None


class Auth:
    def __init__(self, store: Store, *, enabled: bool, admin_key: str | None,
                 key_secret: str | None, cache_ttl_s: float = 5.0,
                 limiter: RateLimiter | None = None) -> None:
        self.store = store
        self.enabled = enabled
        self.admin_key = admin_key or None
        self._configured_secret = key_secret
        self._secret: bytes | None = None
        self._ttl = cache_ttl_s
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._lookups: dict[str, asyncio.Future[ApiKey | None]] = {}
        # Where key rate limits are counted: this process, Redis or the database.
        self.limiter: RateLimiter = limiter or LocalRateLimiter()
        register_secrets([admin_key, key_secret])

    async def secret(self) -> bytes:
        if self._secret is None:
            value = self._configured_secret or await self.store.meta_value(
                "key_hash_secret", secrets.token_hex(32))
            register_secrets([value])
            self._secret = value.encode()
        return self._secret

    @property
    def secret_source(self) -> str:
        return "FLUX_PROXY_KEY_SECRET" if self._configured_secret else "database"

    async def create(self, name: str, **fields: Any) -> tuple[str, ApiKey]:
        """A new key: (the key itself, shown once; its stored row, with its webhook
        signing secret, also shown once)."""
        key = generate_key()
        row = ApiKey(id=new_key_id(), name=name, key_hash=hash_key(key, await self.secret()),
                     prefix=key[:12], webhook_secret=webhook_secrets.new_secret(), **fields)
        return key, await self.store.create_key(row)

    async def rotate_webhook_secret(self, key: ApiKey, grace_s: float) -> ApiKey:
        """A new signing secret for `key`'s webhooks; the old one signs too for
        `grace_s`. The row as it now is (its new secret, shown once)."""
        secret, previous, until = webhook_secrets.rotation(key, grace_s)
        await self.store.set_webhook_secret(key.id, secret, previous, until)
        self._cache.clear()  # the next request sees the new secret at once
        row = await self.store.find_key(key.id)
        assert row is not None
        return row

    async def revoke(self, key_id: str) -> bool:
        revoked = await self.store.revoke_key(key_id)
        self._cache.clear()  # this replica stops accepting it at once; others within TTL
        return revoked

    async def lookup(self, key: str) -> ApiKey | None:
        digest = hash_key(key, await self.secret())
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        # One lookup per key at a time: when an entry expires under load, the
        # requests that missed wait for the same query instead of each running it.
        pending = self._lookups.get(digest)
        if pending is not None:
            await asyncio.wait([pending])  # its failure is not ours: then look it up here
            if not pending.cancelled() and pending.exception() is None:
                return pending.result()
        pending = asyncio.get_running_loop().create_future()
        self._lookups[digest] = pending
        try:
            row = await self.store.key_by_hash(digest)
        except BaseException:
            pending.cancel()
            raise
        finally:
            if self._lookups.get(digest) is pending:
                del self._lookups[digest]
        pending.set_result(row)
        if len(self._cache) > 10_000:  # bounded: unknown keys must not grow it forever
            self._cache.clear()
        self._cache[digest] = (now + self._ttl, row)
        return row

    async def authenticate(self, header: str | None) -> Principal:
        if not self.enabled:
            return Principal()
        token = _bearer(header)
        if token is None:
            raise NotAuthorizedException("missing API key: send Authorization: Bearer <key>")
        if self.admin_key and hmac.compare_digest(token, self.admin_key):
            return Principal(admin=True)
        row = await self.lookup(token)
        if row is None:
            raise NotAuthorizedException("unknown API key")
        if row.revoked_at is not None and row.revoked_at <= utcnow():
            raise NotAuthorizedException("API key revoked")
        return Principal(key=row)

    async def rate_limit(self, key: ApiKey) -> float | None:
        """Seconds to wait when `key` is over its rate; None when allowed."""
        if not key.rate_per_s:
            return None
        burst = float(key.burst or max(1, math.ceil(key.rate_per_s)))
        return await self.limiter.take(key.id, key.rate_per_s, burst)


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def require_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard of every /v1 route: any valid key (or the admin key)."""
    auth: Auth = connection.app.state.auth
    connection.state.principal = await auth.authenticate(connection.headers.get("authorization"))


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any],
                        _: BaseRouteHandler) -> None:
    """Guard of /admin routes: the admin key only (FLUX_PROXY_ADMIN_KEY)."""
    auth: Auth = connection.app.state.auth
    if not auth.admin_key:
        raise PermissionDeniedException("admin routes are off: set FLUX_PROXY_ADMIN_KEY")
    # Checked even when client auth is switched off.
    token = _bearer(connection.headers.get("authorization"))
    if token is None:
        raise NotAuthorizedException("missing admin key: send Authorization: Bearer <key>")
    if not hmac.compare_digest(token, auth.admin_key):
        raise PermissionDeniedException("this route needs the admin key")
    connection.state.principal = Principal(admin=True)


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    principal: Principal = getattr(connection.state, "principal", Principal())
    return principal
