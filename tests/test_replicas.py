"""Two proxy replicas sharing one database split and hand over work."""

from __future__ import annotations

from pathlib import Path

from providers.simulators import SimulatorServer

from .conftest import make_settings, running_proxy, wait_for, wait_terminal


async def test_cancel_sent_to_another_replica_stops_the_driving_one(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    vibedream_sim.config.job_latency_s = 10.0
    sims = {"vibedream": vibedream_sim}
    a = make_settings(tmp_path, sims, instance_id="replica-a", lease_s=0.6)
    b = make_settings(tmp_path, sims, instance_id="replica-b", lease_s=0.6)
    async with running_proxy(a) as ca, running_proxy(b) as cb:
        r = await ca.post("/v1/predictions", json={"prompt": "x", "size": "512*512"})
        pred_id = r.json()["id"]
        await wait_for(cb, pred_id, lambda b: b["attempts"], timeout_s=5)
        # B does not drive it: it records the request; A's lease sweeper acts on it.
        r = await cb.post(f"/v1/predictions/{pred_id}/cancel")
        assert r.status_code == 200
        done = await wait_terminal(ca, pred_id, timeout_s=5)
    assert done["status"] == "canceled"
    assert done["attempts"][0]["status"] == "canceled"
    assert vibedream_sim.stats["submits"] == 1
