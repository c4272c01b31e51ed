"""Signed output URLs: `/v1/predictions/{id}/outputs/{n}?expires=<unix>&sig=<mac>`.

SDK code written for OpenAI, WaveSpeed or VibeDream downloads an image URL bare, with
no Authorization header, as those providers' URLs are capabilities. The URLs the proxy
lists for the outputs it keeps are capabilities too: an HMAC (SHA-256, 144 bits shown)
over the path and its expiry, under a key derived from the key-hash secret (so every
replica of one database signs and checks alike), valid until the output's retention
ends. Without the signature the route still takes the caller's key. Changing
FLUX_PROXY_KEY_SECRET voids the signatures already handed out (the key still works).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

_LABEL = b"flux-proxy output urls"
_MAC_BYTES = 18


def derive_key(secret: bytes) -> bytes:
    """A key of its own for output URLs, from the key-hash secret."""
    return hmac.new(secret, _LABEL, hashlib.sha256).digest()


def signature(key: bytes, path: str, expires: int) -> str:
    mac = hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).digest()[:_MAC_BYTES]
    return base64.urlsafe_b64encode(mac).decode("ascii")


def signed(key: bytes, path: str, expires: int) -> str:
    return f"{path}?expires={expires}&sig={signature(key, path, expires)}"


def valid(key: bytes, path: str, expires: str, sig: str, now: float) -> bool:
    """The signature is ours for this path and expiry, and the expiry is ahead."""
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
        return False
    if int(expires) <= now:
        return False
    return hmac.compare_digest(signature(key, path, int(expires)), sig)
