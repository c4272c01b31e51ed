"""Alembic, driven from code: the migrations ship inside the package.

`upgrade(engine)` is what `Store.upgrade()` runs at startup. `alembic_config`
gives a Config for tooling (e.g. `command.revision(cfg, autogenerate=True)`)
that works from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text

from proxy.store.db import normalize_url

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
# pg_advisory_xact_lock key: replicas starting together migrate one at a time.
_MIGRATION_LOCK_KEY = 0x666C_7578_6D69  # "fluxmi"


def alembic_config(url: str | None = None, *, schema: str | None = None) -> Config:
    """An in-memory alembic Config pointing at the packaged migrations."""
    from alembic.config import Config  # alembic only where migrations run: not in serving memory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal '%' (e.g. in a password) is '%%'.
        cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    cfg.attributes["schema"] = schema
    return cfg


async def upgrade(
    engine: AsyncEngine, *, schema: str | None = None, revision: str = "head"
) -> None:
    """Bring the database to `revision` in one transaction. Idempotent."""
    async with engine.connect() as conn:
        # SQLite: take the write lock up front so a concurrent upgrade waits
        # (busy_timeout) instead of failing on a read->write lock upgrade.
        conn = await conn.execution_options(flux_sqlite_begin="BEGIN IMMEDIATE")
        async with conn.begin():
            if conn.dialect.name == "postgresql":
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                )
                if schema is not None:
                    # `schema` was validated as a plain identifier by db.create_engine.
                    await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            await conn.run_sync(_upgrade_sync, schema, revision)


def _upgrade_sync(connection: Connection, schema: str | None, revision: str) -> None:
    from alembic import command

    cfg = alembic_config(schema=schema)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None before the first upgrade)."""
    from alembic.runtime.migration import MigrationContext

    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision()
        )
