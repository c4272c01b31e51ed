"""Client API keys and meta values of `MemoryStore` (see keys.py for the SQL)."""

from __future__ import annotations

from collections.abc import Callable

from proxy.store._memory_rows import KEYS, Row, turn
from proxy.store.keys import DuplicateKeyName
from proxy.store.models import ApiKey, utcnow


class MemoryKeysMixin:
    def __init__(self) -> None:
        self._keys: dict[str, Row] = {}  # in insertion order
        self._meta: dict[str, str] = {}

    async def create_key(self, key: ApiKey) -> ApiKey:
        await turn()
        row = KEYS.row(key)
        if key.id in self._keys or any(r["name"] == key.name or r["key_hash"] == key.key_hash
                                       for r in self._keys.values()):
            raise DuplicateKeyName(f"a key named {key.name!r} exists")
        self._keys[key.id] = row
        return key

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        await turn()
        return self._first_key(lambda r: r["key_hash"] == key_hash)

    async def find_key(self, id_or_name: str) -> ApiKey | None:
        await turn()
        return self._first_key(lambda r: id_or_name in (r["id"], r["name"]))

    async def list_keys(self, *, include_revoked: bool = True) -> list[ApiKey]:
        await turn()
        rows = sorted(self._keys.values(), key=lambda r: (r["created_at"], r["name"]))
        return [KEYS.load(r) for r in rows if include_revoked or r["revoked_at"] is None]

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke an active key; False when it is unknown or already revoked."""
        await turn()
        row = self._keys.get(key_id)
        if row is None or row["revoked_at"] is not None:
            return False
        row["revoked_at"] = KEYS.cell("revoked_at", utcnow())
        return True

    async def meta_value(self, name: str, default: str) -> str:
        await turn()
        return self._meta.setdefault(name, default)

    def _first_key(self, match: Callable[[Row], bool]) -> ApiKey | None:
        row = next((r for r in self._keys.values() if match(r)), None)
        return None if row is None else KEYS.load(row)
