"""Small helpers the store modules share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy.engine import CursorResult, Result


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
