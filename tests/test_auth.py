"""Client keys: every /v1 route needs one; admin routes; isolation; rate limits; no leaks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from litestar import Litestar

from providers.simulators import SimConfig, SimulatorServer
from proxy.app import create_app

from .conftest import make_settings, running_proxy

ADMIN = "admin-key-0b7c41"
UPSTREAM_KEY = "ws-upstream-key-55e1"
BODY = {"prompt": "a lighthouse", "size": "512*512", "enable_sync_mode": True}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def settings(tmp_path: Path, wavespeed_sim: SimulatorServer) -> Any:
    return make_settings(tmp_path, {"wavespeed": wavespeed_sim}, auth_enabled=True,
                         admin_key=ADMIN)


async def create_key(c: Any, name: str, **spec: Any) -> str:
    r = await c.post("/admin/keys", json={"name": name, **spec}, headers=bearer(ADMIN))
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


def v1_routes(app: Litestar) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        if route.path.startswith("/v1"):
            for method in getattr(route, "methods", ()):
                if method not in ("HEAD", "OPTIONS"):
                    out.append((method, route.path.replace("{prediction_id:str}", "x")))
    return out


async def test_every_v1_route_needs_a_valid_key(settings: Any) -> None:
    routes = v1_routes(create_app(settings))
    assert ("POST", "/v1/predictions") in routes and ("GET", "/v1/spend") in routes
    async with running_proxy(settings) as c:
        for method, path in routes:
            for headers, why in (({}, "missing"), (bearer("fpk_nope"), "unknown"),
                                 ({"Authorization": "Basic abc"}, "missing")):
                r = await c.request(method, path, headers=headers, json=BODY)
                assert r.status_code == 401, (method, path, r.text)
                err = r.json()["error"]
                # OpenAI's routes answer in OpenAI's shape (tests/test_surface_openai.py).
                native = not path.startswith(("/v1/images", "/v1/models/"))
                code = "unauthorized" if native else "invalid_api_key"
                assert err["code"] == code and why in err["message"], (method, path, err)
        # Health, readiness, metrics and the schema stay open to probes.
        for path in ("/healthz", "/readyz", "/metrics", "/schema/openapi.json"):
            assert (await c.get(path)).status_code == 200, path


async def test_key_works_until_revoked(settings: Any) -> None:
    async with running_proxy(settings) as c:
        key = await create_key(c, "app-a", meta={"team": "growth"})
        assert key.startswith("fpk_") and len(key) > 40
        r = await c.post("/v1/predictions", json=BODY, headers=bearer(key))
        assert r.status_code == 200 and r.json()["status"] == "completed"
        listing = (await c.get("/admin/keys", headers=bearer(ADMIN))).json()["data"]
        [row] = [k for k in listing if k["name"] == "app-a"]
        assert row["meta"] == {"team": "growth"} and row["prefix"] == key[:12]
        assert "key" not in row and "key_hash" not in row
        revoked = await c.post("/admin/keys/app-a/revoke", headers=bearer(ADMIN))
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        r = await c.get("/v1/models", headers=bearer(key))
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        again = await c.post("/admin/keys/app-a/revoke", headers=bearer(ADMIN))
        assert again.status_code == 409
        assert (await c.post("/admin/keys/nope/revoke", headers=bearer(ADMIN))).status_code == 404


async def test_admin_routes(settings: Any, tmp_path: Path,
                            wavespeed_sim: SimulatorServer) -> None:
    async with running_proxy(settings) as c:
        assert (await c.get("/admin/keys")).status_code == 401
        client_key = await create_key(c, "app-b")
        assert (await c.get("/admin/keys", headers=bearer(client_key))).status_code == 403
        dup = await c.post("/admin/keys", json={"name": "app-b"}, headers=bearer(ADMIN))
        assert dup.status_code == 409
        bad = await c.post("/admin/keys", json={"name": "x y", "budget_usd": -1,
                                                "rate": "fast"}, headers=bearer(ADMIN))
        assert bad.status_code == 422
        assert {d["field"] for d in bad.json()["error"]["details"]} == {
            "name", "budget_usd", "rate"}
    # Without FLUX_PROXY_ADMIN_KEY the admin routes are off, even with auth disabled.
    off = make_settings(tmp_path, {"wavespeed": wavespeed_sim})
    async with running_proxy(off) as c:
        r = await c.get("/admin/keys", headers=bearer("anything"))
        assert r.status_code == 403 and "FLUX_PROXY_ADMIN_KEY" in r.json()["error"]["message"]


async def test_a_key_sees_only_its_own_predictions_and_the_admin_sees_all(
    settings: Any,
) -> None:
    async with running_proxy(settings) as c:
        a, b = await create_key(c, "a"), await create_key(c, "b")
        pa = (await c.post("/v1/predictions", json=BODY, headers=bearer(a))).json()
        pb = (await c.post("/v1/predictions", json=BODY, headers=bearer(b))).json()
        assert (await c.get(f"/v1/predictions/{pb['id']}", headers=bearer(a))).status_code == 404
        cancel = await c.post(f"/v1/predictions/{pb['id']}/cancel", headers=bearer(a))
        assert cancel.status_code == 404
        mine = (await c.get("/v1/predictions", headers=bearer(a))).json()["data"]
        assert [p["id"] for p in mine] == [pa["id"]]
        everyone = (await c.get("/v1/predictions", headers=bearer(ADMIN))).json()["data"]
        assert {p["id"] for p in everyone} == {pa["id"], pb["id"]}


async def test_rate_limit_answers_429_with_retry_after(settings: Any) -> None:
    async with running_proxy(settings) as c:
        key = await create_key(c, "rl", rate="2/s", burst=2)
        body = {**BODY, "enable_sync_mode": False}
        codes = [(await c.post("/v1/predictions", json=body, headers=bearer(key))).status_code
                 for _ in range(2)]
        assert codes == [202, 202]
        r = await c.post("/v1/predictions", json=body, headers=bearer(key))
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
        # Other keys are not affected; the limited key recovers after the wait.
        other = await create_key(c, "other")
        assert (await c.post("/v1/predictions", json=body,
                             headers=bearer(other))).status_code == 202
        await anyio.sleep(0.6)
        assert (await c.post("/v1/predictions", json=body,
                             headers=bearer(key))).status_code == 202


async def test_keys_never_appear_in_logs(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with SimulatorServer("wavespeed", SimConfig(api_key=UPSTREAM_KEY)) as sim:
        settings = make_settings(tmp_path, {"wavespeed": sim}, auth_enabled=True,
                                 admin_key=ADMIN, key_secret="hash-secret-9d1f",
                                 provider_extra={"wavespeed": {"api_key": UPSTREAM_KEY}})
        async with running_proxy(settings) as c:
            key = await create_key(c, "logged")
            r = await c.post("/v1/predictions", json=BODY, headers=bearer(key))
            assert r.json()["status"] == "completed"
            await c.post("/v1/predictions", json=BODY, headers=bearer("fpk_wrong_key_123"))
            await c.post("/v1/predictions", json={**BODY, "prompt": "x [sim:500]"},
                         headers=bearer(key))
    out = capsys.readouterr()
    text = out.out + out.err
    for secret in (key, ADMIN, UPSTREAM_KEY, "hash-secret-9d1f", "fpk_wrong_key_123"):
        assert secret not in text, secret
    events = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    key_id = r.json()["id"]
    finished = [e for e in events if e.get("prediction_id") == key_id
                and e["event"] == "prediction.finished"]
    assert finished and finished[0]["api_key_id"].startswith("key_")  # the id, never the key


async def test_concurrent_requests_of_one_key_share_one_lookup(tmp_path: Path) -> None:
    # When a key's cache entry expires under load, the requests that missed wait for
    # one query instead of each running it (a burst of N would be N queries).
    import asyncio

    from proxy.accounts.auth import Auth
    from proxy.store import Store

    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}")
    await store.upgrade()
    try:
        auth = Auth(store, enabled=True, admin_key=None, key_secret="s" * 32)
        key, row = await auth.create("team")
        calls = 0
        real = store.key_by_hash

        async def counted(digest: str) -> Any:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return await real(digest)

        store.key_by_hash = counted  # type: ignore[method-assign]
        found = await asyncio.gather(*(auth.authenticate(f"Bearer {key}") for _ in range(50)))
        assert calls == 1 and all(p.key_id == row.id for p in found)
    finally:
        await store.dispose()
