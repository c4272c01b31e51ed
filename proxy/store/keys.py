"""Client API keys: create, look up by keyed hash, list, revoke."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from proxy.store.models import ApiKey, Meta, utcnow


class DuplicateKeyName(ValueError):
    pass


class KeysMixin:
    """API-key operations of `Store`."""

    _sessions: async_sessionmaker[AsyncSession]

    async def _write(self, stmt: Any) -> int:
        raise NotImplementedError

    async def create_key(self, key: ApiKey) -> ApiKey:
        async with self._sessions() as session:
            session.add(key)
            try:
                await session.commit()
            except IntegrityError as exc:
                raise DuplicateKeyName(f"a key named {key.name!r} exists") from exc
        return key

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        async with self._sessions() as session:
            return (await session.scalars(
                select(ApiKey).where(col(ApiKey.key_hash) == key_hash))).first()

    async def find_key(self, id_or_name: str) -> ApiKey | None:
        async with self._sessions() as session:
            return (await session.scalars(select(ApiKey).where(
                or_(col(ApiKey.id) == id_or_name, col(ApiKey.name) == id_or_name)))).first()

    async def list_keys(self, *, include_revoked: bool = True) -> list[ApiKey]:
        stmt = select(ApiKey).order_by(col(ApiKey.created_at), col(ApiKey.name))
        if not include_revoked:
            stmt = stmt.where(col(ApiKey.revoked_at).is_(None))
        async with self._sessions() as session:
            return list(await session.scalars(stmt))

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke an active key; False when it is unknown or already revoked."""
        stmt = (update(ApiKey)
                .where(col(ApiKey.id) == key_id, col(ApiKey.revoked_at).is_(None))
                .values(revoked_at=utcnow()))
        return await self._write(stmt) > 0

    async def meta_value(self, name: str, default: str) -> str:
        """The stored value of `name`, storing `default` first if there is none
        (replicas racing to store it all end up with the first one written)."""
        async with self._sessions() as session:
            row = await session.get(Meta, name)
            if row is not None:
                return row.value
            session.add(Meta(name=name, value=default))
            try:
                await session.commit()
                return default
            except IntegrityError:
                await session.rollback()
        async with self._sessions() as session:
            row = await session.get(Meta, name)
            assert row is not None
            return row.value
