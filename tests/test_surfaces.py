"""Every wire format is the same service: one key's predictions from all four surfaces
are one list, one ledger and one budget, and each surface refuses in its own shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from providers.simulators import SimulatorServer
from proxy.metrics import REGISTRY

from .conftest import make_settings, running_proxy, wait_terminal

ADMIN = "surfaces-admin-key"
PROMPT = "a lighthouse at dusk"


def accepted(surface: str) -> float:
    return REGISTRY.get_sample_value("flux_proxy_predictions_accepted_total",
                                     {"model": "flux-dev", "surface": surface}) or 0.0


async def one_per_surface(c: Any, key: dict[str, str]) -> dict[str, Any]:
    """One 512x512 image through each surface; each answer as that surface gives it."""
    native = await c.post("/v1/predictions", headers=key, json={
        "prompt": PROMPT, "size": "512*512", "enable_sync_mode": True})
    openai = await c.post("/v1/images/generations", headers=key, json={
        "model": "flux-dev", "prompt": PROMPT, "size": "512x512", "n": 1})
    wavespeed = await c.post("/api/v3/wavespeed-ai/flux-dev", headers=key, json={
        "prompt": PROMPT, "size": "512*512", "enable_sync_mode": True})
    vibedream = await c.post("/api/v1/models/flux-dev/generate", headers=key, json={
        "prompt": PROMPT, "size": "512*512"})
    return {"native": native, "openai": openai, "wavespeed": wavespeed,
            "vibedream": vibedream}


async def test_one_key_one_ledger_one_budget_across_surfaces(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, auth_enabled=True,
                             admin_key=ADMIN)
    before = {s: accepted(s) for s in ("native", "openai", "wavespeed", "vibedream")}
    async with running_proxy(settings) as c:
        # $0.048: exactly four WaveSpeed images at $0.012, one per surface.
        made = await c.post("/admin/keys", json={"name": "all-surfaces", "budget_usd": "0.048",
                                                 "period": "day"},
                            headers={"Authorization": f"Bearer {ADMIN}"})
        assert made.status_code == 201, made.text
        key = {"Authorization": f"Bearer {made.json()['key']}"}

        first = await one_per_surface(c, key)
        assert {s: r.status_code for s, r in first.items()} == {
            "native": 200, "openai": 200, "wavespeed": 200, "vibedream": 200}
        ids = {s: r.headers["x-flux-prediction-id"] for s, r in first.items()}
        assert len(set(ids.values())) == 4
        await wait_terminal(c, ids["vibedream"], headers=key)

        # One list for the key, each prediction saying which surface it came through.
        listed = (await c.get("/v1/predictions?limit=10", headers=key)).json()["data"]
        assert {p["id"]: p["surface"] for p in listed} == {v: k for k, v in ids.items()}
        assert all(p["status"] == "completed" and p["cost_usd"] == "0.012000"
                   for p in listed)
        # One ledger: the key's spend is the four attempts.
        spend = (await c.get("/v1/spend?group_by=key",
                             headers={"Authorization": f"Bearer {ADMIN}"})).json()
        [row] = [r for r in spend["data"] if r["group"] == "all-surfaces"]
        assert row["cost_usd"] == "0.048000" and row["predictions"] == 4

        # One budget: spent, so every surface refuses, each in its own shape, and
        # nothing more goes upstream.
        refused = await one_per_surface(c, key)
    native, openai, wavespeed, vibedream = (refused[s] for s in (
        "native", "openai", "wavespeed", "vibedream"))
    assert native.status_code == 402
    assert native.json()["error"]["code"] == "budget_exceeded"
    assert openai.status_code == 429 and openai.headers["x-should-retry"] == "false"
    assert openai.json()["error"]["code"] == "insufficient_quota"
    assert wavespeed.status_code == 402
    assert wavespeed.json()["code"] == 402 and "all-surfaces" in wavespeed.json()["message"]
    assert vibedream.status_code == 402 and "all-surfaces" in vibedream.json()["error"]
    assert wavespeed_sim.stats["submits"] == 4
    # Counted once each, by surface.
    assert {s: accepted(s) - before[s] for s in before} == {
        "native": 1, "openai": 1, "wavespeed": 1, "vibedream": 1}
