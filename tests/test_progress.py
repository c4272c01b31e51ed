"""Steps of a running prediction: where the upstream reports them (our GPU worker's
`progress`), GET /v1/predictions/{id} shows `progress: {step, total}` while it runs,
and null once it ended or for upstreams that report none."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from providers.local import _progress
from providers.simulators import SimulatorServer
from worker.app import create_worker_app
from worker.settings import WorkerSettings
from worker.testing import FakeEngine

from ._serve import serving_app
from .conftest import make_settings, running_proxy, wait_terminal

STEPS = 20


async def test_a_running_prediction_shows_the_workers_steps(
    tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    worker = create_worker_app(
        WorkerSettings(safety_checker="none", warmup=False, batch_window_ms=0,
                       log_level="warning"), engine=FakeEngine(step_s=0.05))
    with serving_app(worker, "worker") as worker_url:
        settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim},
                                 routing={"order": ["local", "wavespeed"]})
        settings.providers["local"] = {"worker_urls": [worker_url], "poll_initial_s": 0.05,
                                       "poll_max_s": 0.1}
        async with running_proxy(settings) as c:
            r = await c.post("/v1/predictions", json={
                "prompt": "a lighthouse", "size": "256*256", "num_inference_steps": STEPS})
            pred_id = r.json()["id"]
            seen: list[dict[str, Any]] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                body = (await c.get(f"/v1/predictions/{pred_id}")).json()
                if body["status"] != "processing":
                    break
                if body["progress"] is not None:
                    seen.append(body["progress"])
            done = await wait_terminal(c, pred_id)
            # The WaveSpeed simulator reports no steps.
            other = (await c.post("/v1/predictions", json={
                "prompt": "a lighthouse", "size": "256*256", "providers": ["wavespeed"],
                "enable_sync_mode": True})).json()
    assert done["status"] == "completed" and done["provider"] == "local"
    assert done["progress"] is None and other["progress"] is None
    assert seen, "no progress was ever shown while it ran"
    assert all(p["total"] == STEPS and 0 <= p["step"] <= STEPS for p in seen)
    steps = [p["step"] for p in seen]
    assert steps == sorted(steps) and any(0 < s < STEPS for s in steps)


@pytest.mark.parametrize("value, expected", [
    ({"step": 3, "total": 28}, (3, 28)),
    ({"step": 0, "total": 28}, (0, 28)),
    ({"step": 29, "total": 28}, None),
    ({"step": "3", "total": 28}, None),
    ({"step": 1, "total": 0}, None),
    ({"step": True, "total": 2}, None),
    (None, None),
    ([3, 28], None),
])
def test_only_a_sane_progress_is_passed_on(value: Any, expected: Any) -> None:
    assert _progress(value) == expected
