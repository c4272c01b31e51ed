"""How `MemoryStore` keeps rows: plain dicts of column values, held the way the
database holds them (times as aware UTC, JSON columns serialized), loaded into
fresh model objects on every read so callers never share state with the store."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON
from sqlalchemy.exc import IntegrityError

from proxy.store.models import ApiKey, Attempt, Prediction, UTCDateTime

Row = dict[str, Any]


class Table:
    """One model's rows: column values as the database stores them."""

    def __init__(self, model: type[Any]) -> None:
        columns = model.__table__.columns
        self.model = model
        self.names = tuple(columns.keys())
        self.json = frozenset(c.name for c in columns if isinstance(c.type, JSON))
        self.times = frozenset(c.name for c in columns if isinstance(c.type, UTCDateTime))

    def cell(self, name: str, value: Any) -> Any:
        if value is None:
            return None
        if name in self.json:
            return json.dumps(value)
        if name in self.times:
            return utc(value)
        return value

    def row(self, obj: Any) -> Row:
        return {name: self.cell(name, getattr(obj, name)) for name in self.names}

    def cells(self, values: dict[str, Any]) -> Row:
        return {name: self.cell(name, value) for name, value in values.items()}

    def load(self, row: Row) -> Any:
        return self.model(**{name: json.loads(value) if name in self.json and value is not None
                             else value for name, value in row.items()})

    def update(self, row: Row | None, values: dict[str, Any]) -> bool:
        """UPDATE one row if it matched; True when it did."""
        cells = self.cells(values)  # a value the database would refuse fails either way
        if row is None:
            return False
        row.update(cells)
        return True


PREDICTIONS, ATTEMPTS, KEYS = Table(Prediction), Table(Attempt), Table(ApiKey)


def utc(value: datetime) -> datetime:
    """What UTCDateTime stores and hands back: aware UTC (naive is taken as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def integrity_error(table: str, why: str) -> IntegrityError:
    """What SQLAlchemy raises for a broken constraint."""
    return IntegrityError(f"INSERT INTO {table}", None, Exception(why))


async def turn() -> None:
    """A database call suspends its caller; so does every MemoryStore call (once,
    before it reads anything, so each call stays atomic)."""
    await asyncio.sleep(0)
