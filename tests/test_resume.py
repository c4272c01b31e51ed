"""Nothing accepted is lost: a proxy killed with SIGKILL mid-prediction resumes
it after restart, polling the upstream id it recorded, never submitting twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from providers.simulators import SimulatorServer

from ._serve import write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_config(path: Path, sim: SimulatorServer, db: Path, lease_s: float) -> None:
    write_config(path, sim, f"sqlite+aiosqlite:///{db}", lease_s=lease_s, log_level="warning")


@contextmanager
def proxy_process(config: Path, instance_id: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_"))}
    env.update(FLUX_PROXY_CONFIG=str(config), FLUX_PROXY_INSTANCE_ID=instance_id)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 40
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(f"{base}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _get(base: str, pred_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/predictions/{pred_id}", timeout=5)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _wait(base: str, pred_id: str, cond: Any, timeout_s: float = 40) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body = _get(base, pred_id)
        if cond(body):
            return body
        assert time.monotonic() < deadline, f"timed out; last state: {body}"
        time.sleep(0.05)


@pytest.mark.parametrize(("second_instance", "lease_s"), [
    ("node-a", 30.0),  # same instance restarts: resumes its own at once
    ("node-b", 1.0),   # another replica takes it over once the lease lapses
])
def test_killed_proxy_resumes_with_exactly_one_upstream_submit(
    tmp_path: Path, vibedream_sim: SimulatorServer, second_instance: str, lease_s: float
) -> None:
    vibedream_sim.config.job_latency_s = 2.0
    config = tmp_path / "proxy.toml"
    _write_config(config, vibedream_sim, tmp_path / "proxy.db", lease_s)

    with proxy_process(config, "node-a") as (base, proc):
        r = httpx.post(f"{base}/v1/predictions",
                       json={"prompt": "a lighthouse", "size": "512*512"}, timeout=5)
        assert r.status_code == 202
        pred_id = r.json()["id"]
        _wait(base, pred_id, lambda b: b["attempts"] and b["attempts"][0]["upstream_id"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert vibedream_sim.stats["submits"] == 1

    with proxy_process(config, second_instance) as (base, _):
        done = _wait(base, pred_id, lambda b: b["status"] in ("completed", "failed"))
    assert done["status"] == "completed", done
    assert len(done["attempts"]) == 1 and done["attempts"][0]["status"] == "completed"
    assert vibedream_sim.stats["submits"] == 1
    assert done["cost_micro_usd"] == 20_000


def test_killed_during_submit_is_never_resubmitted(
    tmp_path: Path, vibedream_sim: SimulatorServer
) -> None:
    config = tmp_path / "proxy.toml"
    _write_config(config, vibedream_sim, tmp_path / "proxy.db", 30.0)
    with proxy_process(config, "node-a") as (base, proc):
        r = httpx.post(f"{base}/v1/predictions", timeout=5, json={
            "prompt": "a lighthouse [sim:submit-latency=3]", "size": "512*512"})
        pred_id = r.json()["id"]
        _wait(base, pred_id, lambda b: bool(b["attempts"]))  # attempt row written
        deadline = time.monotonic() + 5
        while vibedream_sim.stats["submits"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    with proxy_process(config, "node-a") as (base, _):
        done = _wait(base, pred_id, lambda b: b["status"] in ("completed", "failed"))
    # The task may exist upstream: the only provider is not asked again.
    assert done["status"] == "failed"
    assert done["attempts"][0]["status"] == "unknown"
    assert done["attempts"][0]["error_kind"] == "outcome_unknown"
    assert vibedream_sim.stats["submits"] == 1


def test_completed_attempt_behind_an_unfinished_prediction_is_delivered_not_paid_twice(
    tmp_path: Path, vibedream_sim: SimulatorServer, wavespeed_sim: SimulatorServer
) -> None:
    """The crash window found on main: the attempt row says completed, the prediction
    row does not (a row written by an older version, or a database edited by hand).
    With a second provider in the chain the old code submitted again there."""
    import sqlite3

    config = tmp_path / "proxy.toml"
    db = tmp_path / "proxy.db"
    _write_config(config, vibedream_sim, db, 30.0)
    ws_host = urlsplit(wavespeed_sim.base_url).netloc
    config.write_text(config.read_text().replace('order = ["vibedream"]',
                                                 'order = ["vibedream", "wavespeed"]') + f"""
[providers.wavespeed]
base_url = "{wavespeed_sim.base_url}"
api_key = "sim-key"
asset_hosts = ["{ws_host}"]
allow_private_asset_hosts = true
poll_initial_s = 0.05
""")
    body = {"prompt": "a lighthouse", "size": "512*512", "enable_sync_mode": True}
    with proxy_process(config, "node-a") as (base, _):
        first = httpx.post(f"{base}/v1/predictions", json=body, timeout=30).json()
    assert first["status"] == "completed"
    with sqlite3.connect(db) as conn:  # back to "processing", lease expired, attempt untouched
        conn.execute("UPDATE predictions SET status='processing', outputs=NULL, "
                     "completed_at=NULL, lease_owner='node-x', "
                     "lease_expires_at='2000-01-01 00:00:00' WHERE id=?", (first["id"],))
    with proxy_process(config, "node-a") as (base, _):
        done = _wait(base, first["id"], lambda b: b["status"] in ("completed", "failed"))
    assert done["status"] == "completed" and done["outputs"], done
    assert done["provider"] == "vibedream"
    assert vibedream_sim.stats["submits"] == 1 and wavespeed_sim.stats["submits"] == 0
    assert done["cost_micro_usd"] == 20_000  # not 32,000: paid once
