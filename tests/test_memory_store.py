"""MemoryStore against the SQL Store: one set of behavioural assertions, run on
both (a migrated SQLite file, and the in-memory store the lifecycle tests use).
Where they differ, the SQL store is the truth and MemoryStore is wrong."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from proxy.store import Attempt, Prediction, Store, new_id
from proxy.store.budget import BudgetRefused, Hold
from proxy.store.keys import DuplicateKeyName
from proxy.store.memory import MemoryStore
from proxy.store.models import ApiKey
from proxy.store.repo import encode_cursor

KEY = "key-1"
MONTH = datetime(2000, 1, 1, tzinfo=UTC)  # every attempt here is "this period"


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, template_db: Path, tmp_path: Path
                ) -> AsyncIterator[Any]:
    """Either store, with `ops`: the after_write operations in order."""
    ops: list[str] = []
    if request.param == "memory":
        memory = MemoryStore(after_write=ops.append)
        memory.ops = ops  # type: ignore[attr-defined]
        yield memory
        return
    path = tmp_path / "store.db"
    shutil.copy(template_db, path)
    sql = Store(f"sqlite+aiosqlite:///{path}", after_write=ops.append)
    sql.ops = ops  # type: ignore[attr-defined]
    yield sql
    await sql.dispose()


def pred(**kw: Any) -> Prediction:
    base: dict[str, Any] = {"model": "flux-dev", "request": {"prompt": "a cat"}, "seed": 42,
                            "api_key_id": KEY}
    return Prediction(**(base | kw))


async def many(store: Any, n: int, **kw: Any) -> list[str]:
    ids = sorted(new_id() for _ in range(n))
    for i in ids:
        await store.create_prediction(pred(id=i, **kw))
    return ids


def attempt(prediction_id: str, seq: int, **kw: Any) -> Attempt:
    return Attempt(prediction_id=prediction_id, seq=seq, provider=f"p{seq}", api_key_id=KEY, **kw)


def hold(amount: int, budget: int = 100) -> Hold:
    return Hold(KEY, budget, MONTH, amount)


async def test_create_get_update_and_detached_copies(store: Any) -> None:
    plus5 = timezone(timedelta(hours=5))
    created = datetime(2025, 3, 1, 17, 30, 15, 123456, tzinfo=plus5)
    request = {"prompt": "ünïcode", "size": (1024, 768), "n": None}
    p = pred(request=request, created_at=created, timings={"a": 1})
    assert await store.create_prediction(p) is p
    p.request["prompt"] = "changed after the write"
    got = await store.get_prediction(p.id)
    assert got is not None and got is not p
    assert got.request == {"prompt": "ünïcode", "size": [1024, 768], "n": None}  # JSON
    assert got.created_at == created and got.created_at.utcoffset() == timedelta(0)
    got.request["prompt"] = "changed by a reader"
    got.status = "failed"
    again = await store.get_prediction(p.id)
    assert again is not None and again.request["prompt"] == "ünïcode"
    assert again.status == "queued"

    naive = datetime(2025, 1, 2, 3, 4, 5)
    assert await store.update_prediction(p.id, status="processing", started_at=naive)
    updated = await store.get_prediction(p.id)
    assert updated is not None and updated.status == "processing"
    assert updated.started_at == naive.replace(tzinfo=UTC)
    assert updated.updated_at > again.updated_at
    assert not await store.update_prediction(new_id(), status="failed")
    for bad in ({"nope": 1}, {"id": new_id()}, {"status": "done"}):
        with pytest.raises(ValueError):
            await store.update_prediction(p.id, **bad)
    with pytest.raises(IntegrityError):
        await store.create_prediction(pred(id=p.id))
    assert await store.get_prediction(new_id()) is None
    assert store.ops == ["create_prediction", "update_prediction", "update_prediction"]


async def test_finish_is_conditional(store: Any) -> None:
    a, b = await many(store, 2)
    assert await store.claim(a, "w1", 30)
    done_at = datetime(2025, 5, 5, tzinfo=UTC)
    assert await store.finish_prediction(a, status="completed", outputs=["u"],
                                         cost_micro_usd=25, completed_at=done_at)
    done = await store.get_prediction(a)
    assert done is not None and done.status == "completed" and done.completed_at == done_at
    assert done.outputs == ["u"] and done.cost_micro_usd == 25 and done.error is None
    assert done.lease_owner is None and done.lease_expires_at is None
    assert not await store.finish_prediction(a, status="canceled", error="late")
    still = await store.get_prediction(a)
    assert still is not None and still.status == "completed" and still.error is None
    assert not await store.finish_prediction(new_id(), status="failed")
    with pytest.raises(ValueError):
        await store.finish_prediction(b, status="processing")
    assert await store.update_prediction(a, error="unconditional")  # not a lifecycle guard
    assert store.ops[-4:] == ["finish_prediction", "finish_prediction", "finish_prediction",
                              "update_prediction"]


async def test_finish_with_attempt(store: Any) -> None:
    a, b = await many(store, 2)
    first = attempt(a, 1)
    assert await store.begin_attempt(first)
    assert await store.finish_with_attempt(
        a, first.id, {"status": "completed", "cost_micro_usd": 7, "images": 1},
        status="completed", outputs=["u"], cost_micro_usd=7)
    found = await store.get_with_attempts(a)
    assert found is not None
    assert found[0].status == "completed" and found[0].completed_at is not None
    assert found[0].outputs == ["u"] and found[0].lease_owner is None
    assert [(x.status, x.cost_micro_usd, x.images) for x in found[1]] == [("completed", 7, 1)]
    # The prediction is already terminal: its row stays, the attempt's cost is still kept.
    assert not await store.finish_with_attempt(a, first.id, {"cost_micro_usd": 9},
                                               status="failed")
    found = await store.get_with_attempts(a)
    assert found is not None and found[0].status == "completed"
    assert found[1][0].cost_micro_usd == 9
    with pytest.raises(ValueError):
        await store.finish_with_attempt(b, first.id, {}, status="processing")
    with pytest.raises(ValueError):
        await store.finish_with_attempt(b, first.id, {"bogus": 1}, status="failed")
    assert store.ops[-3:] == ["begin_attempt", "finish_with_attempt", "finish_with_attempt"]


async def test_begin_attempt_against_cancel_and_end(store: Any) -> None:
    a, b, c = await many(store, 3)
    before = await store.get_prediction(a)
    first = attempt(a, 1)
    assert await store.begin_attempt(first) and first.id is not None
    bumped = await store.get_prediction(a)
    assert bumped is not None and before is not None and bumped.updated_at > before.updated_at
    with pytest.raises(IntegrityError):  # one attempt per (prediction, seq)
        await store.begin_attempt(attempt(a, 1))
    unchanged = await store.get_prediction(a)
    assert unchanged is not None and unchanged.updated_at == bumped.updated_at

    canceled = await store.request_cancel(b)
    assert canceled is not None and canceled.cancel_requested and canceled.status == "queued"
    late = attempt(b, 1)
    assert not await store.begin_attempt(late) and late.id is None
    await store.finish_prediction(c, status="failed")
    assert not await store.begin_attempt(attempt(c, 1))
    assert not await store.begin_attempt(attempt(new_id(), 1))
    ended = await store.request_cancel(c)  # terminal: returned unchanged
    assert ended is not None and not ended.cancel_requested
    assert await store.request_cancel(new_id()) is None
    assert await store.cancel_requested_among([c, b, a, b]) == [b]
    assert await store.cancel_requested_among([]) == []
    found = await store.get_with_attempts(b)
    assert found is not None and found[1] == []
    assert store.ops.count("begin_attempt") == 1


async def test_attempt_rows_ordering_and_constraints(store: Any) -> None:
    p1, p2 = await many(store, 2)
    for pid, seqs in ((p1, (3, 1, 2)), (p2, (2, 1))):
        for seq in seqs:
            added = await store.add_attempt(attempt(pid, seq))
            assert added.id is not None
    missing = new_id()
    by_pred = await store.attempts_for([p2, p1, missing, p1])
    assert list(by_pred) == [p2, p1, missing]
    assert [x.seq for x in by_pred[p1]] == [1, 2, 3] and [x.seq for x in by_pred[p2]] == [1, 2]
    assert by_pred[missing] == [] and await store.attempts_for([]) == {}
    found = await store.get_with_attempts(p1)
    assert found is not None and [x.seq for x in found[1]] == [1, 2, 3]
    row = found[1][0]
    assert row.id is not None and await store.update_attempt(row.id, status="processing")
    assert not await store.update_attempt(10**9, status="failed")
    with pytest.raises(ValueError):
        await store.update_attempt(row.id, status="bogus")
    with pytest.raises(IntegrityError):
        await store.add_attempt(attempt(p1, 2))
    with pytest.raises(IntegrityError):  # foreign key
        await store.add_attempt(attempt(missing, 1))
    assert store.ops[-7:] == ["add_attempt"] * 5 + ["update_attempt"] * 2


async def test_budget_holds(store: Any) -> None:
    await store.create_key(ApiKey(id=KEY, name="team", key_hash="h" * 64, prefix="fp"))
    p1 = pred()
    await store.create_prediction(p1, hold(60))
    assert await store.exposure(KEY, MONTH) == (0, 60)
    refused = pred()
    with pytest.raises(BudgetRefused) as caught:
        await store.create_prediction(refused, hold(41))
    assert (caught.value.spent, caught.value.reserved, caught.value.amount) == (0, 60, 41)
    assert await store.get_prediction(refused.id) is None
    # The attempt's hold replaces the admission hold: 70 fits although 60 + 70 would not.
    a1 = attempt(p1.id, 1)
    assert await store.begin_attempt(a1, hold(70)) and a1.reserved_micro_usd == 70
    assert await store.exposure(KEY, MONTH) == (0, 70)
    p2 = pred()
    await store.create_prediction(p2, hold(30))  # 70 + 30 == 100: at the edge, allowed
    with pytest.raises(BudgetRefused):
        await store.create_prediction(pred(), hold(1))
    # Refused at begin: nothing written, the admission hold stays.
    a2 = attempt(p2.id, 1)
    with pytest.raises(BudgetRefused) as caught:
        await store.begin_attempt(a2, hold(31))
    assert (caught.value.spent, caught.value.reserved) == (0, 70)
    assert a2.id is None and (await store.attempts_for([p2.id]))[p2.id] == []
    assert await store.exposure(KEY, MONTH) == (0, 100)

    await store.accept_attempt(a1, raise_hold_to=80, status="processing")  # a quote above
    assert await store.exposure(KEY, MONTH) == (0, 110)
    await store.accept_attempt(a1, raise_hold_to=50, upstream_id="u1")  # never lowered
    assert await store.exposure(KEY, MONTH) == (0, 110)
    await store.end_attempt(a1, status="completed", cost_micro_usd=90)
    assert await store.exposure(KEY, MONTH) == (90, 30)
    assert await store.spent_since(KEY, MONTH) == 90
    assert await store.spent_since(KEY, datetime.now(UTC) + timedelta(days=1)) == 0
    assert await store.exposure("other-key", MONTH) == (0, 0)
    assert store.ops[-3:] == ["update_attempt"] * 3


async def test_holds_at_the_prediction_end_keep_running_attempts(store: Any) -> None:
    p = pred()
    await store.create_prediction(p, hold(10, budget=1000))
    running, loser = attempt(p.id, 1), attempt(p.id, 2)
    assert await store.begin_attempt(running, hold(20, budget=1000))
    assert await store.begin_attempt(loser, hold(30, budget=1000))
    assert await store.exposure(KEY, MONTH) == (0, 50)
    await store.accept_attempt(running, status="processing")
    assert loser.id is not None
    await store.update_attempt(loser.id, status="failed", cost_micro_usd=5)  # hold kept
    assert await store.exposure(KEY, MONTH) == (5, 50)
    assert await store.finish_prediction(p.id, status="failed")
    assert await store.exposure(KEY, MONTH) == (5, 20)  # the running one keeps its own
    await store.end_attempt(running, status="canceled", cost_micro_usd=20)
    assert await store.exposure(KEY, MONTH) == (25, 0)

    q = pred()
    await store.create_prediction(q, hold(10, budget=1000))
    winner = attempt(q.id, 1)
    assert await store.begin_attempt(winner, hold(20, budget=1000))
    assert await store.finish_with_attempt(q.id, winner.id, {"status": "completed"},
                                           status="completed")
    assert await store.exposure(KEY, MONTH) == (25, 0)

    r = pred()  # a hedge loser whose process died: released once stale
    await store.create_prediction(r, hold(10, budget=1000))
    orphan = attempt(r.id, 1)
    assert await store.begin_attempt(orphan, hold(40, budget=1000))
    await store.accept_attempt(orphan, status="processing")
    await store.finish_prediction(r.id, status="failed")
    assert await store.exposure(KEY, MONTH) == (25, 40)
    assert await store.release_stale_holds(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await store.release_stale_holds(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await store.exposure(KEY, MONTH) == (25, 0)


async def test_leases(store: Any) -> None:
    now = datetime.now(UTC)
    past, future = now - timedelta(hours=1), now + timedelta(hours=1)
    (free,) = await many(store, 1)
    (expired,) = await many(store, 1, status="processing", lease_owner="dead",
                            lease_expires_at=past)
    (live,) = await many(store, 1, status="processing", lease_owner="other",
                         lease_expires_at=future)
    await many(store, 1, status="completed")
    await many(store, 1, status="failed", lease_expires_at=past)

    got = await store.claim_resumable("me", 30, 10)
    assert [p.id for p in got] == sorted([free, expired])
    assert all(p.lease_owner == "me" and p.lease_expires_at > now + timedelta(seconds=20)
               for p in got)
    assert await store.claim_resumable("you", 30, 10) == []
    assert await store.claim_resumable("me", 30, 0) == []
    assert [p.id for p in await store.claim_resumable("me", 30, 1, include_own=True)] == [
        min(free, expired)]
    assert [p.id for p in await store.claim_resumable("other", 30, 10, include_own=True)] == [
        live]

    assert not await store.claim(live, "me", 30)  # someone else's live lease
    assert await store.claim(live, "other", 60)  # theirs: extended
    assert await store.claim(free, "me", 5)
    await store.update_prediction(free, lease_expires_at=past)
    assert await store.claim(free, "you", 30)  # expired: taken over
    assert not await store.claim(new_id(), "me", 30)
    for owner, lease_s in (("", 30), ("w" * 65, 30), ("me", 0)):
        with pytest.raises(ValueError):
            await store.claim(free, owner, lease_s)

    assert await store.renew_leases("me", [free, expired, live, expired], 120) == 1
    renewed = await store.get_prediction(expired)
    assert renewed is not None and renewed.lease_expires_at > now + timedelta(seconds=100)
    assert await store.renew_leases("me", [], 120) == 0
    assert not await store.release(expired, "you")
    assert await store.release(expired, "me")
    released = await store.get_prediction(expired)
    assert released is not None and released.lease_owner is None
    assert released.lease_expires_at is None
    assert not await store.release(expired, "me")
    assert "claim" not in " ".join(store.ops)  # leases are not lifecycle writes


async def test_listing_and_cursor(store: Any) -> None:
    mine = await many(store, 5)
    other = await many(store, 2, api_key_id="k2", status="completed")
    seen, cursor = [], None
    while True:
        page, cursor = await store.list_predictions(cursor=cursor, limit=3)
        seen += [p.id for p in page]
        if cursor is None:
            break
    assert seen == sorted(mine + other, reverse=True)
    page, nxt = await store.list_predictions(limit=7)
    assert len(page) == 7 and nxt is None
    page, nxt = await store.list_predictions(api_key_id=KEY, limit=2)
    assert [p.id for p in page] == sorted(mine, reverse=True)[:2]
    assert nxt == encode_cursor(page[-1].id)
    page, nxt = await store.list_predictions(status="completed")
    assert [p.id for p in page] == sorted(other, reverse=True) and nxt is None
    assert await store.list_predictions(api_key_id="nobody") == ([], None)
    for bad in ({"limit": 0}, {"status": "bogus"}, {"cursor": "!!!"},
                {"cursor": encode_cursor("hello")}):
        with pytest.raises(ValueError):
            await store.list_predictions(**bad)


async def test_keys_and_meta(store: Any) -> None:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    first = ApiKey(id="k1", name="beta", key_hash="a" * 64, prefix="fp_a", created_at=t0,
                   budget_micro_usd=5, budget_period="day", meta={"team": "x"})
    assert await store.create_key(first) is first
    await store.create_key(ApiKey(id="k2", name="alpha", key_hash="b" * 64, prefix="fp_b",
                                  created_at=t0))
    for dup in (ApiKey(id="k3", name="beta", key_hash="c" * 64, prefix="p"),
                ApiKey(id="k1", name="gamma", key_hash="d" * 64, prefix="p"),
                ApiKey(id="k4", name="delta", key_hash="a" * 64, prefix="p")):
        with pytest.raises(DuplicateKeyName):
            await store.create_key(dup)
    by_id, by_name = await store.find_key("k1"), await store.find_key("beta")
    assert by_id is not None and by_name is not None and by_id.id == by_name.id == "k1"
    assert by_id.meta == {"team": "x"} and by_id.budget_micro_usd == 5
    assert await store.find_key("nobody") is None
    hashed = await store.key_by_hash("b" * 64)
    assert hashed is not None and hashed.id == "k2"
    assert await store.key_by_hash("z" * 64) is None
    assert [k.name for k in await store.list_keys()] == ["alpha", "beta"]
    assert await store.revoke_key("k2") and not await store.revoke_key("k2")
    assert not await store.revoke_key("nobody")
    assert [k.id for k in await store.list_keys(include_revoked=False)] == ["k1"]
    revoked = await store.find_key("k2")
    assert revoked is not None and revoked.revoked_at is not None
    assert await store.meta_value("secret", "one") == "one"
    assert await store.meta_value("secret", "two") == "one"
    assert store.ops == []
