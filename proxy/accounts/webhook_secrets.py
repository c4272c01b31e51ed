"""Per-key webhook signing secrets (Standard Webhooks' `whsec_` + base64 format).

A key gets one at creation, shown once with the key. Rotation makes a new one and
keeps the old one signing too for a grace period (the header then carries both
signatures, which Standard Webhooks verifiers accept), so a receiver can switch
without dropping a delivery. Unlike the key, the secret is stored readable: the
proxy must sign with it.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime, timedelta

from common.logging import register_secrets
from proxy.store.models import ApiKey, utcnow

PREFIX = "whsec_"


def new_secret() -> str:
    """24 random bytes (192 bits, as Svix and Standard Webhooks' examples use)."""
    secret = PREFIX + base64.b64encode(secrets.token_bytes(24)).decode("ascii")
    register_secrets([secret])  # never in a log line, even by accident
    return secret


def signing_secrets(key: ApiKey, now: datetime | None = None) -> list[str]:
    """The secrets that sign `key`'s webhooks now: its own, and the previous one
    during its grace period."""
    now = now or utcnow()
    out = [key.webhook_secret] if key.webhook_secret else []
    until = key.webhook_secret_prev_until
    if key.webhook_secret_prev and until is not None and until > now:
        out.append(key.webhook_secret_prev)
    return out


def rotation(key: ApiKey, grace_s: float, now: datetime | None = None
             ) -> tuple[str, str | None, datetime | None]:
    """(new secret, previous secret kept, until when) for a rotation of `key`."""
    now = now or utcnow()
    if key.webhook_secret is None or grace_s <= 0:
        return new_secret(), None, None
    return new_secret(), key.webhook_secret, now + timedelta(seconds=grace_s)
