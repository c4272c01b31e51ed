"""The persistence layer, on SQLite (temp file) and the real PostgreSQL.

PostgreSQL tests each get their own schema (unique per test, dropped after),
so parallel runs of the suite never collide. If PostgreSQL is unreachable
they FAIL, unless FLUX_PROXY_SKIP_PG=1 (then they skip).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

from proxy.store import Attempt, Prediction, Store, new_id, normalize_url
from proxy.store.migrate import alembic_config, current_revision
from proxy.store.repo import decode_cursor, encode_cursor

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()

SKIP_PG = os.environ.get("FLUX_PROXY_SKIP_PG") == "1"
# FLUX_PROXY_TEST_PG_URL, if set, is the only candidate.
PG_CANDIDATES = (
    [os.environ["FLUX_PROXY_TEST_PG_URL"]]
    if os.environ.get("FLUX_PROXY_TEST_PG_URL")
    else [
        "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
        "postgresql+asyncpg://root@127.0.0.1:5432/test",
    ]
)
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


async def _probe(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


@functools.cache
def _pg_url() -> str:
    errors = []
    for url in PG_CANDIDATES:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                pool.submit(asyncio.run, _probe(url)).result()
            except Exception as exc:
                errors.append(f"{url}: {exc!r}")
                continue
        return url
    raise RuntimeError("PostgreSQL unreachable: " + "; ".join(errors))


def _require_pg() -> str:
    if SKIP_PG:
        pytest.skip("FLUX_PROXY_SKIP_PG=1: PostgreSQL tests skipped")
    try:
        return _pg_url()
    except RuntimeError as exc:
        pytest.fail(f"{exc} (set FLUX_PROXY_SKIP_PG=1 to skip PostgreSQL tests)")


@dataclass
class Target:
    url: str
    schema: str | None = None

    def store(self) -> Store:
        return Store(self.url, schema=self.schema)


@pytest.fixture(params=BACKENDS)
async def target(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Target]:
    if request.param == "sqlite":
        yield Target(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
        return
    url = _require_pg()
    schema = f"flux_test_{uuid.uuid4().hex}"
    yield Target(url, schema)
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()


@pytest.fixture
async def store(target: Target) -> AsyncIterator[Store]:
    s = target.store()
    await s.upgrade()
    yield s
    await s.dispose()


def pred(**kw: Any) -> Prediction:
    base: dict[str, Any] = {"model": "flux-dev", "request": {"prompt": "a cat"}, "seed": 42}
    return Prediction(**(base | kw))


async def make_many(store: Store, n: int, **kw: Any) -> list[str]:
    ids = sorted(new_id() for _ in range(n))
    for i in ids:
        await store.create_prediction(pred(id=i, **kw))
    return ids


def test_normalize_url() -> None:
    assert normalize_url("postgres://u:p@h/db") == "postgresql+asyncpg://u:p@h/db"
    assert normalize_url("postgresql://h/db") == "postgresql+asyncpg://h/db"
    assert normalize_url("postgresql+asyncpg://h/db") == "postgresql+asyncpg://h/db"
    assert normalize_url("sqlite:///./x.db") == "sqlite+aiosqlite:///./x.db"
    assert normalize_url("sqlite+aiosqlite:///./x.db") == "sqlite+aiosqlite:///./x.db"
    for bad in (lambda: normalize_url("mysql://h/db"), lambda: normalize_url("nope")):
        with pytest.raises(ValueError):
            bad()
    for url, schema in (("sqlite:///x.db", "s"), ("postgresql://h/db", "bad; DROP")):
        with pytest.raises(ValueError):
            Store(url, schema=schema)
    assert "s3cret" not in Store("postgresql://u:s3cret@h/db").safe_url


async def test_sqlite_pragmas(tmp_path: Any) -> None:
    async with Store(f"sqlite:///{tmp_path / 'p.db'}") as s, s.engine.connect() as conn:
        got = [
            (await conn.exec_driver_sql(f"PRAGMA {p}")).scalar()
            for p in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
        ]
    assert got == ["wal", 1, 10_000, 1]


async def test_roundtrip_times_money_json(store: Store) -> None:
    plus5 = timezone(timedelta(hours=5))
    created = datetime(2025, 3, 1, 17, 30, 15, 123456, tzinfo=plus5)
    request = {"prompt": "ünïcode ☃", "size": {"w": 1024, "h": 768}, "guidance": 3.5, "n": None}
    p = pred(
        request=request,
        seed=2**63 - 1,
        cost_micro_usd=2**62 + 7,
        created_at=created,
        timings={"inference": 1.25},
        has_nsfw_contents=[False, True],
    )
    assert (await store.create_prediction(p)) is p
    got = await store.get_prediction(p.id)
    assert got is not None
    assert got.created_at == created and got.created_at.utcoffset() == timedelta(0)
    assert got.created_at.tzinfo is not None and got.updated_at.tzinfo is not None
    assert got.seed == 2**63 - 1 and got.cost_micro_usd == 2**62 + 7
    assert got.request == request and got.timings == {"inference": 1.25}
    assert got.has_nsfw_contents == [False, True] and got.outputs is None
    assert got.status == "queued" and got.cancel_requested is False
    async with store.engine.connect() as conn:  # None is SQL NULL, not JSON 'null'
        nulls = await conn.execute(text("SELECT count(*) FROM predictions WHERE outputs IS NULL"))
        assert nulls.scalar() == 1
    assert await store.get_prediction(new_id()) is None


async def test_list_order_filters_and_pagination(store: Store) -> None:
    ids = await make_many(store, 7, api_key_id="k1")
    other = await make_many(store, 3, api_key_id="k2", status="completed")
    newest_first = sorted(ids + other, reverse=True)

    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = await store.list_predictions(cursor=cursor, limit=3)
        seen += [p.id for p in page]
        pages += 1
        if cursor is None:
            break
    assert seen == newest_first and pages == 4

    page, nxt = await store.list_predictions(limit=10)  # exactly full: no next page
    assert len(page) == 10 and nxt is None
    page, nxt = await store.list_predictions(status="completed", limit=2)
    assert [p.id for p in page] == sorted(other, reverse=True)[:2] and nxt is not None
    page, nxt = await store.list_predictions(status="completed", cursor=nxt, limit=2)
    assert [p.id for p in page] == [min(other)] and nxt is None
    page, _ = await store.list_predictions(api_key_id="k1", status="queued", limit=50)
    assert [p.id for p in page] == sorted(ids, reverse=True)
    assert (await store.list_predictions(api_key_id="nobody", limit=5)) == ([], None)

    assert decode_cursor(encode_cursor(ids[0])) == ids[0]
    bad_cursors = ("", "!!!", encode_cursor("hello"), "a" * 10, ids[0])
    bad_args: list[dict[str, Any]] = [{"limit": 0}, {"status": "bogus"}]
    for bad in bad_args + [{"cursor": c} for c in bad_cursors]:
        with pytest.raises(ValueError):
            await store.list_predictions(**({"limit": 3} | bad))


async def test_attempts(store: Store) -> None:
    p1, p2 = await make_many(store, 2)
    for pid, seqs in ((p1, (3, 1, 2)), (p2, (2, 1))):
        for seq in seqs:
            a = await store.add_attempt(
                Attempt(prediction_id=pid, seq=seq, provider=f"prov{seq}", cost_micro_usd=2**40)
            )
            assert a.id is not None
    missing = new_id()
    by_pred = await store.attempts_for([p1, p2, missing])
    assert [a.seq for a in by_pred[p1]] == [1, 2, 3]
    assert [a.seq for a in by_pred[p2]] == [1, 2] and by_pred[missing] == []
    assert by_pred[p1][0].cost_micro_usd == 2**40 and by_pred[p1][0].created_at.tzinfo
    assert await store.attempts_for([]) == {}

    first = by_pred[p1][0]
    assert first.id is not None
    done = datetime.now(UTC)
    assert await store.update_attempt(
        first.id, status="completed", upstream_id="up-1", latency_ms=1234, completed_at=done
    )
    got = await store.get_with_attempts(p1)
    assert got is not None
    p, attempts = got
    assert p.id == p1 and [a.seq for a in attempts] == [1, 2, 3]
    assert attempts[0].status == "completed" and attempts[0].completed_at == done
    assert await store.get_with_attempts(missing) is None
    assert not await store.update_attempt(10**9, status="failed")
    with pytest.raises(ValueError):
        await store.update_attempt(first.id, status="bogus")

    with pytest.raises(IntegrityError):  # one attempt per (prediction, seq)
        await store.add_attempt(Attempt(prediction_id=p1, seq=2, provider="x"))
    with pytest.raises(IntegrityError):  # foreign keys are enforced (SQLite too)
        await store.add_attempt(Attempt(prediction_id=missing, seq=1, provider="x"))


async def test_update_finish_cancel(store: Store) -> None:
    a, b, c = await make_many(store, 3)
    before = await store.get_prediction(a)
    assert before is not None
    assert await store.update_prediction(a, status="processing", provider="vibedream")
    after = await store.get_prediction(a)
    assert after is not None and after.status == "processing"
    assert after.updated_at > before.updated_at
    assert not await store.update_prediction(new_id(), status="failed")
    for bad in ({"nope": 1}, {"id": new_id()}, {"status": "done"}):
        with pytest.raises(ValueError):
            await store.update_prediction(a, **bad)

    assert await store.claim(a, "w1", 30)
    assert await store.finish_prediction(
        a, status="completed", outputs=["https://x/1.png"], cost_micro_usd=25_000
    )
    done = await store.get_prediction(a)
    assert done is not None and done.status == "completed" and done.completed_at
    assert done.outputs == ["https://x/1.png"] and done.cost_micro_usd == 25_000
    assert done.lease_owner is None and done.lease_expires_at is None
    assert done.provider == "vibedream"  # untouched when not given
    assert not await store.finish_prediction(a, status="canceled")  # terminal stays put
    with pytest.raises(ValueError):
        await store.finish_prediction(b, status="processing")

    canceled = await store.request_cancel(b)
    assert canceled is not None and canceled.cancel_requested and canceled.status == "queued"
    unchanged = await store.request_cancel(a)
    assert unchanged is not None and not unchanged.cancel_requested
    assert await store.request_cancel(new_id()) is None
    assert (await store.get_prediction(c)).cancel_requested is False  # type: ignore[union-attr]


async def test_claim_resumable_selects_only_claimable(store: Store) -> None:
    now = datetime.now(UTC)
    past, future = now - timedelta(hours=1), now + timedelta(hours=1)
    (q_free,) = await make_many(store, 1)
    (p_expired,) = await make_many(
        store, 1, status="processing", lease_owner="dead", lease_expires_at=past
    )
    (p_live,) = await make_many(
        store, 1, status="processing", lease_owner="other", lease_expires_at=future
    )
    await make_many(store, 1, status="completed")
    await make_many(store, 1, status="failed", lease_expires_at=past)
    await make_many(store, 1, status="canceled")

    got = await store.claim_resumable("me", 30, 10)
    assert [p.id for p in got] == sorted([q_free, p_expired])
    for p in got:
        assert p.lease_owner == "me" and p.lease_expires_at is not None
        assert p.lease_expires_at > now + timedelta(seconds=20)
    assert await store.claim_resumable("you", 30, 10) == []  # all now held
    assert [p.id for p in await store.claim_resumable("you", 30, 1)] == []
    live = await store.get_prediction(p_live)
    assert live is not None and live.lease_owner == "other"
    again = await store.claim_resumable("me", 30, 10, include_own=True)  # restarted "me"
    assert [p.id for p in again] == sorted([q_free, p_expired])
    theirs = await store.claim_resumable("other", 30, 10, include_own=True)
    assert [p.id for p in theirs] == [p_live]


async def test_claim_single(store: Store) -> None:
    a, b = await make_many(store, 2)
    assert await store.claim(a, "w1", 30)
    assert not await store.claim(a, "w2", 30)  # someone else's live lease
    assert await store.claim(a, "w1", 60)  # ours: extended
    await store.update_prediction(a, lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert await store.claim(a, "w2", 30)  # expired: taken over
    assert not await store.claim(new_id(), "w1", 30)
    await store.update_prediction(b, status="failed")
    assert not await store.claim(b, "w1", 30)  # terminal
    for owner, lease_s in (("", 30), ("w" * 65, 30), ("w1", 0)):
        with pytest.raises(ValueError):
            await store.claim(a, owner, lease_s)


async def test_renew_and_release(store: Store) -> None:
    a, b, c = await make_many(store, 3)
    assert await store.claim(a, "w1", 1) and await store.claim(b, "w1", 1)
    assert await store.claim(c, "w2", 1)
    assert await store.renew_leases("w1", [a, b, c], 120) == 2
    got = await store.get_prediction(a)
    assert got is not None and got.lease_expires_at is not None
    assert got.lease_expires_at > datetime.now(UTC) + timedelta(seconds=100)
    assert await store.renew_leases("w1", [], 120) == 0

    assert not await store.release(a, "w2")
    assert await store.release(a, "w1")
    got = await store.get_prediction(a)
    assert got is not None and got.lease_owner is None and got.lease_expires_at is None
    assert await store.claim(a, "w2", 30)
    assert await store.renew_leases("w1", [a, b], 30) == 1  # a was taken over


@pytest.mark.parametrize("engines", ["one-engine", "two-engines"])
async def test_concurrent_claimers_never_share(target: Target, engines: str) -> None:
    first = target.store()
    await first.upgrade()
    second = first if engines == "one-engine" else target.store()
    try:
        ids = await make_many(first, 40)

        async def drain(s: Store, owner: str) -> list[str]:
            mine: list[str] = []
            while batch := await s.claim_resumable(owner, 60, 3):
                mine += [p.id for p in batch]
                await asyncio.sleep(0)
            return mine

        got_a, got_b = await asyncio.gather(drain(first, "A"), drain(second, "B"))
        assert not set(got_a) & set(got_b)
        assert sorted(got_a + got_b) == ids

        await first.update_prediction(ids[0], lease_owner=None, lease_expires_at=None)
        for pid in ids[:10]:
            await first.release(pid, "A")
            await first.release(pid, "B")
        results = await asyncio.gather(
            *(s.claim(pid, o, 30) for pid in ids[:10] for s, o in ((first, "A"), (second, "B")))
        )
        assert [results[i] + results[i + 1] for i in range(0, 20, 2)] == [1] * 10
    finally:
        await first.dispose()
        if second is not first:
            await second.dispose()


@pytest.mark.parametrize("target", BACKENDS[1:], indirect=True)
async def test_pg_skip_locked_does_not_wait(target: Target) -> None:
    async with target.store() as s, target.store() as other:
        await s.upgrade()
        locked, free = await make_many(s, 2)
        async with other.engine.connect() as conn, conn.begin():
            await conn.execute(
                text("SELECT id FROM predictions WHERE id = :id FOR UPDATE"), {"id": locked}
            )
            got = await asyncio.wait_for(s.claim_resumable("me", 30, 10), timeout=5)
        assert [p.id for p in got] == [free]


async def test_upgrade_idempotent_and_concurrent(target: Target) -> None:
    async with target.store() as a, target.store() as b:
        assert await current_revision(a.engine) is None
        await asyncio.gather(a.upgrade(), b.upgrade())
        await a.upgrade()
        assert await current_revision(a.engine) == HEAD
        assert await a.ping()


async def test_migrated_schema_matches_models(store: Store) -> None:
    def diff(conn: Any) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(conn), SQLModel.metadata))

    async with store.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_downgrade_to_base(store: Store) -> None:
    def down(conn: Any) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")

    async with store.engine.begin() as conn:
        await conn.run_sync(down)
    assert await current_revision(store.engine) is None
    await store.upgrade()
    assert await current_revision(store.engine) == HEAD


@pytest.mark.parametrize("url", ["sqlite:///x.db", "postgresql://h/db"])
def test_offline_sql_renders(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    command.upgrade(alembic_config(url), "head", sql=True)
    out = capsys.readouterr().out
    assert "CREATE TABLE predictions" in out and "CREATE TABLE attempts" in out
    assert ("TIMESTAMP WITH TIME ZONE" in out) == url.startswith("postgresql")


async def test_ping_false_when_unreachable() -> None:
    async with Store("postgresql://nobody@127.0.0.1:1/none") as s:
        assert not await s.ping(timeout_s=2)
