"""The lifecycle tables as plain Core `Table`s.

Statements built on these skip the ORM's bulk-DML layer (about a third of a
write's CPU when built on the mapped classes); hot writes use them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.orm import Session

from proxy.store.models import Attempt, Prediction, Reservation

# What a write runs on: a Connection (the SQLite writer thread) or a Session.
Tx = Session | Connection

PREDICTIONS: Table = Prediction.__table__  # type: ignore[attr-defined]
ATTEMPTS: Table = Attempt.__table__  # type: ignore[attr-defined]
RESERVATIONS: Table = Reservation.__table__  # type: ignore[attr-defined]


def row_values(obj: Prediction | Attempt) -> dict[str, Any]:
    """Column values of a row object, for a Core INSERT (no ORM unit of work)."""
    table = PREDICTIONS if isinstance(obj, Prediction) else ATTEMPTS
    return {c.key: getattr(obj, c.key) for c in table.columns}
