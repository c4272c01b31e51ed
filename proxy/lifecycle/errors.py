"""What the service refuses with; the API layer maps each onto a status."""

from __future__ import annotations


class NoProvider(Exception):
    """No enabled provider can serve the request; `reasons` says why per provider."""

    def __init__(self, message: str, reasons: dict[str, str], *, configured: bool) -> None:
        super().__init__(message)
        self.reasons = reasons
        self.configured = configured  # False: nothing is enabled at all (a 503)


class Unavailable(Exception):
    """Every provider that could serve the request is open or rate-limited for
    longer than routing.unavailable_wait_s: answer 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass
