"""Persistence: sqlmodel tables, the async `Store` repository, alembic migrations."""

from proxy.store.db import DEFAULT_URL, normalize_url, url_from_env
from proxy.store.models import (
    ATTEMPT_STATUSES,
    PREDICTION_STATUSES,
    TERMINAL_STATUSES,
    Attempt,
    Prediction,
    new_id,
    utcnow,
)
from proxy.store.repo import ACTIVE_STATUSES, Store

__all__ = [
    "ACTIVE_STATUSES",
    "ATTEMPT_STATUSES",
    "DEFAULT_URL",
    "PREDICTION_STATUSES",
    "TERMINAL_STATUSES",
    "Attempt",
    "Prediction",
    "Store",
    "new_id",
    "normalize_url",
    "url_from_env",
    "utcnow",
]
