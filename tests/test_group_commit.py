"""Group commit: many predictions' lifecycle writes share transactions, and one
bad write fails only its own caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from proxy.store import Store
from proxy.store.models import Attempt, Prediction


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(f"sqlite+aiosqlite:///{tmp_path / 'gc.db'}")
    await s.upgrade()
    try:
        yield s
    finally:
        await s.dispose()


def pred(**kw: object) -> Prediction:
    return Prediction(model="flux-dev", request={"prompt": "x"}, seed=1, **kw)


async def test_concurrent_writes_share_transactions_and_all_land(store: Store) -> None:
    preds = [pred(status="processing") for _ in range(100)]
    attempts = [Attempt(prediction_id=p.id, seq=1, provider="a") for p in preds]
    await asyncio.gather(*(store.create_with_attempt(p, a) for p, a in zip(preds, attempts,
                                                                          strict=True)))
    assert store.group.writes == 100
    assert store.group.batches < 20  # 100 callers, a handful of COMMITs
    ids = {a.id for a in attempts}
    assert None not in ids and len(ids) == 100  # each got its own row id back
    ended = await asyncio.gather(*(
        store.finish_with_attempt(p.id, a.id or 0, {"status": "completed", "cost_micro_usd": 7},
                                  status="completed", cost_micro_usd=7)
        for p, a in zip(preds, attempts, strict=True)))
    assert all(ended)
    for p in preds[:5]:
        found = await store.get_with_attempts(p.id)
        assert found is not None
        assert found[0].status == "completed" and found[1][0].cost_micro_usd == 7


async def test_one_bad_write_fails_alone(store: Store) -> None:
    first = pred()
    await store.create_prediction(first)
    fresh = [pred() for _ in range(10)]
    results = await asyncio.gather(
        *(store.create_prediction(p) for p in fresh[:5]),
        store.create_prediction(pred(id=first.id)),  # the same id again: a constraint error
        *(store.create_prediction(p) for p in fresh[5:]),
        return_exceptions=True)
    assert isinstance(results[5], IntegrityError)
    assert [r for i, r in enumerate(results) if i != 5] == fresh
    rows, _ = await store.list_predictions(limit=100)
    assert {r.id for r in rows} == {first.id, *(p.id for p in fresh)}


async def test_a_conditional_write_reports_its_own_rowcount(store: Store) -> None:
    done, live = pred(), pred()
    for p in (done, live):
        await store.create_prediction(p)
    assert await store.finish_prediction(done.id, status="failed")
    again, other = await asyncio.gather(store.finish_prediction(done.id, status="completed"),
                                        store.finish_prediction(live.id, status="completed"))
    assert (again, other) == (False, True)  # batched together, each its own answer
    stored = await store.get_prediction(done.id)
    assert stored is not None and stored.status == "failed"


async def test_batched_and_budget_holding_writes_interleave_on_one_sqlite_file(
        store: Store) -> None:
    # Batches go through the writer thread's connection, writes that take a budget
    # hold through the async engine's: both write the same file, and all land.
    from datetime import UTC, datetime

    from proxy.store.budget import Hold
    from proxy.store.models import ApiKey

    key = await store.create_key(ApiKey(id="k1", name="team", key_hash="h" * 64,
                                        prefix="fp_test", budget_micro_usd=10**9,
                                        budget_period="month"))
    since = datetime(2000, 1, 1, tzinfo=UTC)
    held = [pred(api_key_id=key.id) for _ in range(20)]
    free = [pred() for _ in range(50)]
    await asyncio.gather(
        *(store.create_prediction(p, Hold(key.id, 10**9, since, 1000)) for p in held),
        *(store.create_prediction(p) for p in free))
    rows, _ = await store.list_predictions(limit=200)
    assert {r.id for r in rows} == {p.id for p in held + free}
    assert await store.exposure(key.id, since) == (0, 20 * 1000)
