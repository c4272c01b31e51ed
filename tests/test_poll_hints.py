"""Poll hints against the VibeDream simulator over loopback: its `estimatedTime`
tracks the job's latency (the seed's "5-15s" for a 5 s job), and the proxy does
not poll before the estimate's low end. (The virtual-time tests of the same are
in tests/lifecycle/test_ready_after.py.)"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from providers.simulators import SimulatorServer
from providers.simulators.vibedream import estimated_time

from .conftest import make_settings, running_proxy


@pytest.mark.parametrize(("latency_s", "text"), [
    (5.0, "5-15s"), (0.05, "0-1s"), (1.2, "1-4s"), (0.0, "0-1s"), (12.5, "12-38s"),
])
def test_the_simulator_estimates_its_own_latency(latency_s: float, text: str) -> None:
    assert estimated_time(latency_s) == text


def test_the_simulator_answers_with_the_estimate(vibedream_sim: SimulatorServer) -> None:
    with httpx.Client(base_url=vibedream_sim.base_url,
                      headers={"Authorization": "Bearer sim-key"}) as client:
        r = client.post("/api/v1/models/flux-dev/generate",
                        json={"prompt": "[sim:latency=5] a fox", "size": "512*512"})
    assert r.status_code == 200 and r.json()["estimatedTime"] == "5-15s"


async def test_no_poll_before_the_low_end_of_estimated_time(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    # A 1.2 s job says "1-4s". Polled from 0.02 s on (provider_table's
    # poll_initial_s, x1.5 up to 0.1 s) it would take ~14 GETs; waiting out the
    # first second leaves a handful.
    settings = make_settings(tmp_path, {"vibedream": vibedream_sim})
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={"prompt": "[sim:latency=1.2] a fox",
                                                  "size": "512*512", "enable_sync_mode": True})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed"
    assert 1 <= vibedream_sim.stats["polls"] <= 7
