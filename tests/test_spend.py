"""Spend totals equal the attempt rows exactly; budgets refuse at the edge, also concurrently."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from providers.simulators import SimulatorServer
from proxy.accounts.spend_report import build_report
from proxy.store import Attempt, Prediction, Store, new_id
from proxy.store.models import ApiKey

from .conftest import make_settings, running_proxy, wait_terminal

ADMIN = "spend-admin-key"
PG_URL = os.environ.get("FLUX_PROXY_TEST_PG_URL",
                        "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
BODY = {"prompt": "a lighthouse", "size": "512*512", "enable_sync_mode": True}
DAY0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite+aiosqlite:///{tmp_path / 'spend.db'}")
        await s.upgrade()
        yield s
        await s.dispose()
        return
    if os.environ.get("FLUX_PROXY_SKIP_PG") == "1":
        pytest.skip("FLUX_PROXY_SKIP_PG=1: no PostgreSQL on this machine")
    schema = f"flux_spend_{uuid.uuid4().hex[:10]}"
    s = Store(PG_URL, schema=schema)
    await s.upgrade()
    try:
        yield s
    finally:
        async with s.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await s.dispose()


async def seed_random(store: Store, n: int, rng: random.Random) -> list[tuple[Prediction,
                                                                             Attempt]]:
    keys = []
    for i in range(3):
        keys.append(await store.create_key(ApiKey(id=f"key_{i}", name=f"app-{i}",
                                                  key_hash=f"{i:064x}", prefix="fpk_x")))
    rows = []
    for _ in range(n):
        created = DAY0 + timedelta(seconds=rng.randrange(5 * 86400))
        key = rng.choice([*keys, None])
        pred = await store.create_prediction(Prediction(
            id=new_id(), model=rng.choice(["flux-dev", "flux-dev-alt"]),
            request={"prompt": "x"}, seed=1, created_at=created, updated_at=created,
            api_key_id=key.id if key else None, status="completed"))
        for seq in range(1, rng.randint(1, 3) + 1):
            status = rng.choice(["completed", "failed", "unknown", "canceled"])
            attempt = await store.add_attempt(Attempt(
                prediction_id=pred.id, seq=seq, provider=rng.choice(["wavespeed", "vibedream"]),
                status=status, cost_micro_usd=rng.choice([0, 12_000, 20_000, rng.randrange(10**9)]),
                images=rng.randint(1, 4) if status == "completed" else 0,
                api_key_id=pred.api_key_id, created_at=created + timedelta(seconds=seq)))
            rows.append((pred, attempt))
    return rows


def expected(rows: list[tuple[Prediction, Attempt]], group_by: str | None,
             since: datetime | None = None, until: datetime | None = None) -> dict[Any, tuple]:
    acc: dict[Any, list[Any]] = defaultdict(lambda: [0, 0, set(), 0, 0])
    for pred, a in rows:
        if (since and a.created_at < since) or (until and a.created_at >= until):
            continue
        g = {"key": a.api_key_id, "provider": a.provider, "model": pred.model,
             "day": a.created_at.date().isoformat(), None: None}[group_by]
        cell = acc[g]
        cell[0] += a.cost_micro_usd
        cell[1] += a.images
        cell[2].add(a.prediction_id)
        cell[3] += 1
        cell[4] += a.status in ("failed", "unknown")
    return {g: (c, i, len(p), n, f) for g, (c, i, p, n, f) in acc.items()}


async def test_totals_equal_the_attempt_rows_over_random_predictions(store: Store) -> None:
    rows = await seed_random(store, 300, random.Random(42))
    for group_by in ("key", "provider", "model", "day", None):
        got = {r.group: (r.cost_micro_usd, r.images, r.predictions, r.attempts,
                         r.failed_attempts) for r in await store.spend(group_by)}  # type: ignore[arg-type]
        assert got == expected(rows, group_by), group_by
    since, until = DAY0 + timedelta(days=1), DAY0 + timedelta(days=3, hours=5)
    report = await build_report(store, "day", since=since, until=until)
    assert {r.group for r in report.rows} == {"2026-11-02", "2026-11-03", "2026-11-04"}
    want = expected(rows, None, since, until)[None]
    t = report.total
    assert (t.cost_micro_usd, t.images, t.predictions, t.attempts, t.failed_attempts) == want
    # One key's view is exactly that key's rows.
    mine = await build_report(store, "provider", api_key_id="key_1")
    assert mine.total.cost_micro_usd == sum(
        a.cost_micro_usd for _, a in rows if a.api_key_id == "key_1")


async def test_spend_api_json_csv_and_key_scoping(
    tmp_path: Path, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer
) -> None:
    vibedream_sim.config.fail_after_accept = True  # a billed failed attempt, then WaveSpeed
    settings = make_settings(tmp_path, {"vibedream": vibedream_sim, "wavespeed": wavespeed_sim},
                             auth_enabled=True, admin_key=ADMIN)
    async with running_proxy(settings) as c:
        keys = {}
        for name in ("mkt", "ops"):
            r = await c.post("/admin/keys", json={"name": name},
                             headers={"Authorization": f"Bearer {ADMIN}"})
            keys[name] = {"Authorization": f"Bearer {r.json()['key']}"}
        for name, n in (("mkt", 3), ("ops", 1)):
            for _ in range(n):
                body = (await c.post("/v1/predictions", json=BODY, headers=keys[name])).json()
                assert body["status"] == "completed"
        admin = {"Authorization": f"Bearer {ADMIN}"}
        by_key = (await c.get("/v1/spend?group_by=key", headers=admin)).json()
        rows = {r["group"]: r for r in by_key["data"]}
        # Each prediction: VibeDream 2 cents (failed, billed) + WaveSpeed $0.012.
        assert rows["mkt"]["cost_micro_usd"] == 3 * 32_000 and rows["mkt"]["cost_usd"] == "0.096000"
        assert rows["mkt"]["predictions"] == 3 and rows["mkt"]["failed_attempts"] == 3
        assert rows["mkt"]["images"] == 3 and rows["ops"]["cost_micro_usd"] == 32_000
        assert by_key["total"]["cost_micro_usd"] == 4 * 32_000
        by_provider = (await c.get("/v1/spend?group_by=provider", headers=keys["ops"])).json()
        assert {r["group"]: r["cost_micro_usd"] for r in by_provider["data"]} == {
            "vibedream": 20_000, "wavespeed": 12_000}  # ops sees only its own
        r = await c.get("/v1/spend?group_by=model&format=csv", headers=admin)
        assert r.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(r.text)))
        assert table[0]["group"] == "flux-dev" and table[0]["cost_micro_usd"] == "128000"
        assert table[-1]["group"] == "TOTAL"
        today = datetime.now(UTC).date().isoformat()
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
        window = (await c.get(f"/v1/spend?group_by=day&from={today}&to={tomorrow}",
                              headers=admin)).json()
        assert [r["group"] for r in window["data"]] == [today]
        empty = (await c.get(f"/v1/spend?from={tomorrow}", headers=admin)).json()
        assert empty["data"] == [] and empty["total"]["cost_micro_usd"] == 0
        for bad in ("group_by=team", "from=yesterday", "to=2026-13-01"):
            assert (await c.get(f"/v1/spend?{bad}", headers=admin)).status_code == 422
        metric = REGISTRY.get_sample_value("flux_proxy_cost_usd_total", {
            "provider": "wavespeed", "model": "flux-dev", "key_name": "mkt"})
        assert metric is not None and metric >= 0.036


async def test_budget_refuses_at_the_edge_with_402(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, auth_enabled=True,
                             admin_key=ADMIN)
    async with running_proxy(settings) as c:
        # $0.036 = exactly three WaveSpeed images at $0.012.
        r = await c.post("/admin/keys", json={"name": "capped", "budget_usd": "0.036",
                                              "period": "day"},
                         headers={"Authorization": f"Bearer {ADMIN}"})
        key = {"Authorization": f"Bearer {r.json()['key']}"}
        for _ in range(3):
            ok = await c.post("/v1/predictions", json=BODY, headers=key)
            assert ok.status_code == 200 and ok.json()["status"] == "completed"
        refused = await c.post("/v1/predictions", json=BODY, headers=key)
        assert refused.status_code == 402
        err = refused.json()["error"]
        assert err["code"] == "budget_exceeded" and "capped" in err["message"]
        assert "0.036000" in err["message"]
        assert wavespeed_sim.stats["submits"] == 3  # refused before going upstream
        assert REGISTRY.get_sample_value("flux_proxy_budget_remaining_usd",
                                         {"key_name": "capped"}) == 0.0


async def test_budget_holds_under_concurrent_requests(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    wavespeed_sim.config.job_latency_s = 0.3
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, auth_enabled=True,
                             admin_key=ADMIN)
    async with running_proxy(settings) as c:
        r = await c.post("/admin/keys", json={"name": "burst", "budget_usd": "0.036"},
                         headers={"Authorization": f"Bearer {ADMIN}"})
        key = {"Authorization": f"Bearer {r.json()['key']}"}
        body = {**BODY, "enable_sync_mode": False}
        answers = await asyncio.gather(*(
            c.post("/v1/predictions", json=body, headers=key) for _ in range(10)))
        codes = sorted(a.status_code for a in answers)
        assert codes == [202] * 3 + [402] * 7  # in-flight reservations count
        for a in answers:
            if a.status_code == 202:
                done = await wait_terminal(c, a.json()["id"], headers=key)
                assert done["status"] == "completed"
        spent = (await c.get("/v1/spend", headers=key)).json()["total"]["cost_micro_usd"]
        assert spent == 36_000
