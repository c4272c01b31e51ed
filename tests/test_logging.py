"""Logs: one JSON line per state change with ids; upstream keys never appear."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from common.logging import configure_logging, get_logger, register_secrets
from providers.simulators import SimConfig, SimulatorServer

from .conftest import make_settings, running_proxy

UPSTREAM_KEY = "ws-live-key-7f3a9c"


async def test_full_request_logs_state_changes_without_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with SimulatorServer("wavespeed", SimConfig(api_key=UPSTREAM_KEY)) as sim:
        settings = make_settings(tmp_path, {"wavespeed": sim},
                                 provider_extra={"wavespeed": {"api_key": UPSTREAM_KEY}})
        async with running_proxy(settings) as c:
            r = await c.post("/v1/predictions", json={
                "prompt": "a lighthouse", "size": "512*512", "enable_sync_mode": True})
            assert r.json()["status"] == "completed"
            # A failed upstream call is logged too (error path), still without the key.
            await c.post("/v1/predictions", json={
                "prompt": "x [sim:500]", "size": "512*512", "enable_sync_mode": True})
    out = capsys.readouterr()
    text = out.out + out.err
    assert UPSTREAM_KEY not in text
    events = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    pred_id = r.json()["id"]
    mine = [e["event"] for e in events if e.get("prediction_id") == pred_id]
    assert mine[0] == "prediction.queued"
    assert "attempt.submitting" in mine and "attempt.finished" in mine
    assert mine[-1] == "prediction.finished"
    finished = next(e for e in events
                    if e["event"] == "prediction.finished" and e["prediction_id"] == pred_id)
    assert finished["provider"] == "wavespeed" and finished["status"] == "completed"
    assert finished["level"] == "info" and "timestamp" in finished


def test_redaction_of_secrets_sensitive_keys_and_bearer_tokens() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    register_secrets(["vd-secret-123456"])
    log = get_logger("t")
    log.info("upstream said", reason="bad key vd-secret-123456 given",
             api_key="anything", headers={"Authorization": "Bearer abc.def"},
             note="Authorization: Bearer tok_987654321")
    line = json.loads(stream.getvalue())
    assert "vd-secret-123456" not in stream.getvalue()
    assert line["api_key"] == "[REDACTED]"
    assert line["headers"]["Authorization"] == "[REDACTED]"
    assert "tok_987654321" not in line["note"]
