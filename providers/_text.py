"""Upstream text made fit for a client (error reasons quoted from a provider)."""

from __future__ import annotations

REASON_MAX = 200


def safe_text(text: str | None, secret: str | None = None) -> str:
    """Upstream text made fit for a client: one line, key scrubbed, truncated."""
    if not text:
        return ""
    text = " ".join(text.split())
    if secret:
        text = text.replace(secret, "***")
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 1] + "…"
