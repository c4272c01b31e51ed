"""The media exception hierarchy.

``reason`` is always safe to show to the API client; ``detail`` (optional) is
for operators' logs only and may name internal addresses.
"""

from __future__ import annotations


class MediaError(Exception):
    """An image could not be fetched, decoded or encoded."""

    def __init__(self, reason: str, *, field: str | None = None, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class BlockedURL(MediaError):
    """The outbound guard refused a URL (SSRF protection, host allow/deny lists)."""


class TooLarge(MediaError):
    """The payload (bytes, pixels or dimensions) exceeds a configured limit."""
