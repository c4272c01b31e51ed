"""Logs: one JSON line per state change with ids (pretty lines on a terminal); upstream
keys and image data never appear."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from common.logging import configure_logging, get_logger, register_secrets, resolve_format
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


def test_inline_image_data_never_reaches_a_line() -> None:
    """A data URI's payload, and bare base64 of an image, are replaced by their length;
    ids, URLs and ordinary text stay as they are."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2).decode()
    jpeg = base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(200)).decode()
    get_logger("t").info("upstream said", error=f"bad image data:image/png;base64,{png} end",
                         image=png, nested={"outputs": [jpeg]}, url="https://cdn.example.com/"
                         "outputs/2026/01/02/0f3c9a7e5b2d4c1a8e6f.png",
                         prediction_id="01a2357b-5e64-769f-88f8-60a826e52431",
                         upstream_id="eaf4100c020346cd9ee5a415bcd4e20e")
    text = stream.getvalue()
    line = json.loads(text)
    assert png[:24] not in text and jpeg[:24] not in text
    assert line["error"] == f"bad image data:image/png;base64,[{len(png)} chars] end"
    assert line["image"] == f"[base64, {len(png)} chars]"
    assert line["nested"] == {"outputs": [f"[base64, {len(jpeg)} chars]"]}
    assert line["url"] == "https://cdn.example.com/outputs/2026/01/02/0f3c9a7e5b2d4c1a8e6f.png"
    assert line["prediction_id"] == "01a2357b-5e64-769f-88f8-60a826e52431"
    assert line["upstream_id"] == "eaf4100c020346cd9ee5a415bcd4e20e"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_is_json_unless_the_stream_is_a_terminal() -> None:
    piped, terminal = io.StringIO(), _Terminal()
    assert resolve_format("auto", piped) == "json"
    assert resolve_format("auto", terminal) == "console"
    assert resolve_format("json", terminal) == "json"
    assert resolve_format("console", piped) == "console"
    configure_logging("info", "auto", stream=piped)
    get_logger("t").info("proxy.started", port=8080)
    assert json.loads(piped.getvalue())["event"] == "proxy.started"
    configure_logging("info", "auto", stream=terminal)
    get_logger("t").info("proxy.started", port=8080)
    line = terminal.getvalue()
    assert "proxy.started" in line and "port" in line and not line.startswith("{")
