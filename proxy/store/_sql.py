"""Small helpers the store modules share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy.engine import CursorResult, Result

from proxy.store.models import PREDICTION_STATUSES, TERMINAL_STATUSES, Prediction, utcnow


def checked_fields(
    model: type[Any], fields: dict[str, Any], statuses: Sequence[str]
) -> dict[str, Any]:
    columns = set(model.__table__.columns.keys())
    unknown = sorted(set(fields) - columns)
    if unknown:
        raise ValueError(f"unknown {model.__name__} field(s): {', '.join(unknown)}")
    if "id" in fields:
        raise ValueError(f"{model.__name__}.id cannot be updated")
    if "status" in fields and fields["status"] not in statuses:
        raise ValueError(f"invalid {model.__name__} status {fields['status']!r}")
    return fields


def rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


def prediction_end(status: str, fields: dict[str, Any], operation: str) -> dict[str, Any]:
    """The columns a prediction's end sets: `fields` (checked), the terminal `status`,
    its lease given up, `completed_at` (now unless given) and `updated_at`."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"{operation} needs a terminal status, got {status!r}")
    now = utcnow()
    values = checked_fields(Prediction, fields, PREDICTION_STATUSES) | {
        "status": status, "updated_at": now, "lease_owner": None, "lease_expires_at": None}
    if values.get("completed_at") is None:
        values["completed_at"] = now
    return values
