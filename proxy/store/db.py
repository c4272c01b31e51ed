"""Async engine creation: URL normalization and per-backend connection setup.

SQLite is the single-process default; PostgreSQL is for several replicas.
Both go through SQLAlchemy's asyncio extension (aiosqlite / asyncpg).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

ENV_VAR = "FLUX_PROXY_DATABASE_URL"
DEFAULT_URL = "sqlite+aiosqlite:///./flux-proxy.db"

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_POOL_SIZE = 10
PG_MAX_OVERFLOW = 10

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_SCHEME_REWRITES = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+psycopg": "postgresql+asyncpg",
    "postgresql+psycopg2": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
}


def url_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The configured database URL (`FLUX_PROXY_DATABASE_URL`), normalized."""
    env = os.environ if environ is None else environ
    return normalize_url(env.get(ENV_VAR) or DEFAULT_URL)


def normalize_url(url: str) -> str:
    """Rewrite sync-driver URLs to their async drivers.

    `postgres://` and `postgresql://` become `postgresql+asyncpg://`;
    `sqlite:///` becomes `sqlite+aiosqlite:///`. Async URLs pass unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    scheme = _SCHEME_REWRITES.get(scheme.lower(), scheme)
    parsed = make_url(f"{scheme}://{rest}")
    if parsed.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ValueError(
            f"unsupported database driver {parsed.drivername!r}: "
            "use sqlite+aiosqlite:// or postgresql+asyncpg://"
        )
    return f"{scheme}://{rest}"


def backend_of(url: str) -> str:
    """'sqlite' or 'postgresql'."""
    return make_url(normalize_url(url)).get_backend_name()


def create_engine(url: str, *, schema: str | None = None, echo: bool = False) -> AsyncEngine:
    """An AsyncEngine for `url`, configured for its backend.

    `schema` (PostgreSQL only) puts every connection's `search_path` on that
    schema, so tables, the alembic version table and all queries live there.
    """
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite":
        if schema is not None:
            raise ValueError("schema= is only supported on PostgreSQL")
        return _sqlite_engine(parsed, echo=echo)
    if schema is not None and not _SCHEMA_RE.fullmatch(schema):
        raise ValueError(f"schema must be a lowercase SQL identifier, got {schema!r}")
    return _postgres_engine(parsed, schema=schema, echo=echo)


def _sqlite_engine(url: URL, *, echo: bool) -> AsyncEngine:
    kwargs: dict[str, Any] = {}
    in_memory = url.database in (None, "", ":memory:")
    if in_memory:
        # One shared connection, or every connection would see its own empty db.
        kwargs["poolclass"] = StaticPool
    engine = create_async_engine(
        url,
        echo=echo,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        **kwargs,
    )
    _sqlite_session_setup(engine.sync_engine, in_memory=in_memory)
    return engine


def is_sqlite_file(url: str) -> bool:
    """A SQLite database on disk (not in memory, where each connection has its own)."""
    parsed = make_url(normalize_url(url))
    return parsed.get_backend_name() == "sqlite" and parsed.database not in (
        None, "", ":memory:")


def sqlite_writer_engine(url: str) -> Engine:
    """A synchronous engine on the same SQLite file, for the store's writer thread
    (group_commit.py): one connection, set up as the async engine's are."""
    if not is_sqlite_file(url):
        raise ValueError(f"not a SQLite file: {url}")
    parsed = make_url(normalize_url(url))
    engine = sa_create_engine(
        parsed.set(drivername="sqlite+pysqlite"),
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        pool_size=1, max_overflow=0,
    )
    _sqlite_session_setup(engine, in_memory=False)
    return engine


def _sqlite_session_setup(sync_engine: Engine, *, in_memory: bool) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions
        # begin (see `_on_begin`), so reads are transactional too and DDL is
        # transactional for alembic.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Deferred BEGIN by default: every write method in the repository
        # starts its transaction with a write, so the write lock is taken up
        # front (waiting up to busy_timeout) and never upgraded mid-transaction.
        # A connection can ask for "BEGIN IMMEDIATE" via execution options.
        conn.exec_driver_sql(conn.get_execution_options().get("flux_sqlite_begin", "BEGIN"))


def _postgres_engine(url: URL, *, schema: str | None, echo: bool) -> AsyncEngine:
    server_settings = {"application_name": "flux-proxy"}
    if schema is not None:
        server_settings["search_path"] = schema
    return create_async_engine(
        url,
        echo=echo,
        pool_size=PG_POOL_SIZE,
        max_overflow=PG_MAX_OVERFLOW,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"server_settings": server_settings},
    )
