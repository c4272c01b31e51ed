"""The proxy end to end through the `local` adapter and a real `flux-proxy worker`
process running the tiny FLUX pipeline on CPU: results, spill-over to a simulator
when the worker is busy, and failover when the worker is killed mid-job."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from providers.simulators import SimulatorServer

from .conftest import make_settings, running_proxy, wait_for

NEEDS = "a real `flux-proxy worker` needs the [local] extra"
pytest.importorskip("torch", reason=f"{NEEDS} (torch)")
pytest.importorskip("diffusers", reason=f"{NEEDS} (diffusers)")

BODY = {"prompt": "a lighthouse", "size": "256*256", "num_inference_steps": 2,
        "enable_sync_mode": True}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.engine.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@dataclass
class Worker:
    url: str
    proc: subprocess.Popen[bytes]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def worker(tiny_model: Path) -> Iterator[Worker]:
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_WORKER_")}
    env |= {"HF_HUB_OFFLINE": "1", "FLUX_WORKER_LOG_LEVEL": "warning",
            "FLUX_WORKER_BATCH_WINDOW_MS": "5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "worker", "--model", str(tiny_model),
         "--device", "cpu", "--dtype", "fp32", "--port", str(port),
         "--safety-checker", "none"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # loads the model and warms up first
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.2)
        yield Worker(url, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def local_settings(tmp_path: Path, worker: Worker, sims: dict[str, SimulatorServer],
                   **local: Any) -> Any:
    settings = make_settings(tmp_path, sims, routing={"order": ["local", *sims]})
    settings.providers["local"] = {"worker_urls": [worker.url], "read_timeout_s": 10,
                                   "poll_initial_s": 0.05, "poll_max_s": 0.2, **local}
    return settings


async def test_prediction_through_the_local_worker(
    tmp_path: Path, worker: Worker, wavespeed_sim: SimulatorServer
) -> None:
    async with running_proxy(local_settings(tmp_path, worker, {"wavespeed": wavespeed_sim},
                                            gpu_hourly_usd="3.60")) as c:
        r = await c.post("/v1/predictions", json={**BODY, "num_images": 2, "seed": 7,
                                                  "enable_base64_output": True,
                                                  "output_format": "png"})
        body = r.json()
        again = (await c.post("/v1/predictions", json={
            **BODY, "num_images": 2, "seed": 7, "enable_base64_output": True,
            "output_format": "png"})).json()
    assert body["status"] == "completed", body
    assert body["provider"] == "local" and wavespeed_sim.stats["submits"] == 0
    assert body["has_nsfw_contents"] == [False, False] and body["seed"] == 7
    images = [Image.open(io.BytesIO(base64.b64decode(o.split(",", 1)[1])))
              for o in body["outputs"]]
    assert all(i.size == (256, 256) and i.format == "PNG" for i in images)
    # One generator per image: the same request and seed reproduce the same bytes
    # (a different batch composition may differ in the last bits of float math).
    assert again["outputs"] == body["outputs"]
    assert body["outputs"][0] != body["outputs"][1]
    # GPU-seconds x $3.60/h = 1,000 micro-USD per GPU-second.
    [attempt] = body["attempts"]
    assert attempt["provider"] == "local" and attempt["cost_micro_usd"] > 0
    assert body["timings"]["inference_ms"] >= 0


async def test_spills_over_to_a_paid_provider_when_the_worker_is_busy(
    tmp_path: Path, worker: Worker, wavespeed_sim: SimulatorServer
) -> None:
    settings = local_settings(tmp_path, worker, {"wavespeed": wavespeed_sim},
                              spill_queue_depth=0)
    async with running_proxy(settings) as c:
        slow = await c.post("/v1/predictions", json={
            **BODY, "num_inference_steps": 20, "enable_sync_mode": False})
        await wait_for(c, slow.json()["id"], lambda b: b["attempts"]
                       and b["attempts"][0]["upstream_id"], timeout_s=30)
        spilled = (await c.post("/v1/predictions", json=BODY)).json()
        assert spilled["status"] == "completed" and spilled["provider"] == "wavespeed"
        assert [a["provider"] for a in spilled["attempts"]] == ["wavespeed"]
        done = await wait_for(c, slow.json()["id"], lambda b: b["status"] != "processing",
                              timeout_s=120)
    assert done["status"] == "completed" and done["provider"] == "local"


async def test_worker_killed_mid_job_fails_over(
    tmp_path: Path, worker: Worker, wavespeed_sim: SimulatorServer
) -> None:
    settings = local_settings(tmp_path, worker, {"wavespeed": wavespeed_sim},
                              worker_lost_after_s=0.5)
    async with running_proxy(settings) as c:
        r = await c.post("/v1/predictions", json={
            **BODY, "num_inference_steps": 40, "enable_sync_mode": False})
        pred_id = r.json()["id"]
        await wait_for(c, pred_id, lambda b: b["attempts"] and b["attempts"][0]["upstream_id"],
                       timeout_s=30)
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(timeout=10)
        done = await wait_for(c, pred_id, lambda b: b["status"] != "processing", timeout_s=30)
    assert done["status"] == "completed" and done["provider"] == "wavespeed"
    first, second = done["attempts"]
    assert first["provider"] == "local" and first["status"] == "failed"
    assert first["error_kind"] == "unavailable"
    assert second["provider"] == "wavespeed" and second["status"] == "completed"
