"""Settings: env vars named by the seeds, FLUX_PROXY_* vars, the TOML file, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from providers.vibedream import VibeDreamSettings
from providers.wavespeed import WaveSpeedSettings
from proxy.config import Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.database_url.startswith("sqlite+aiosqlite:///")
    assert s.routing.order == ["local", "wavespeed", "vibedream"]
    providers = s.provider_settings()
    kind, local = providers["local"]
    assert kind == "local" and local.missing("local") == "no workers (set LOCAL_WORKER_URLS)"
    kind, vd = providers["vibedream"]
    assert kind == "vibedream" and isinstance(vd, VibeDreamSettings)
    assert vd.base_url == "https://api.vibedream.ai" and vd.api_key is None
    _, ws = providers["wavespeed"]
    assert isinstance(ws, WaveSpeedSettings)
    assert ws.base_url == "https://api.wavespeed.ai" and ws.price_micro_usd_per_image == 12_000


def test_seed_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIBEDREAM_API_KEY", "vd-secret")
    monkeypatch.setenv("VIBEDREAM_BASE_URL", "http://127.0.0.1:9001")
    monkeypatch.setenv("WAVESPEED_API_KEY", "ws-secret")
    monkeypatch.setenv("WAVESPEED_BASE_URL", "http://127.0.0.1:9002")
    p = Settings().provider_settings()
    assert p["vibedream"][1].api_key is not None
    assert p["vibedream"][1].api_key.get_secret_value() == "vd-secret"
    assert p["vibedream"][1].base_url == "http://127.0.0.1:9001"
    assert p["wavespeed"][1].base_url == "http://127.0.0.1:9002"
    assert "ws-secret" not in repr(p["wavespeed"][1])  # SecretStr hides it


def test_local_worker_urls_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORKER_URLS", "http://10.0.0.5:8090, http://10.0.0.6:8090/")
    monkeypatch.setenv("LOCAL_API_KEY", "worker-token")
    _, local = Settings().provider_settings()["local"]
    assert local.worker_urls == ["http://10.0.0.5:8090", "http://10.0.0.6:8090"]  # type: ignore[attr-defined]
    assert local.missing("local") is None
    assert local.api_key is not None and local.api_key.get_secret_value() == "worker-token"


def test_flux_proxy_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_PROXY_PORT", "9090")
    monkeypatch.setenv("FLUX_PROXY_DATABASE_URL", "postgresql://u@127.0.0.1/db")
    monkeypatch.setenv("FLUX_PROXY_ROUTING__ORDER", '["vibedream"]')
    s = Settings()
    assert s.port == 9090 and s.database_url == "postgresql://u@127.0.0.1/db"
    assert s.routing.order == ["vibedream"]


def test_toml_file_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "flux.toml"
    cfg.write_text(
        """
port = 7000
sync_timeout_s = 30

[routing]
order = ["vibedream", "wavespeed"]

[providers.vibedream]
api_key = "from-toml"
poll_initial_s = 0.5
deadline_s = 120

[providers.wavespeed]
price_micro_usd_per_image = 15000
use_native_sync = false

[providers.acme]
kind = "wavespeed"
base_url = "http://127.0.0.1:9999"
"""
    )
    monkeypatch.setenv("FLUX_PROXY_CONFIG", str(cfg))
    monkeypatch.setenv("FLUX_PROXY_PORT", "7100")  # env beats the file
    monkeypatch.setenv("ACME_API_KEY", "acme-key")  # any provider table reads NAME_API_KEY
    s = Settings()
    assert s.port == 7100 and s.sync_timeout_s == 30
    assert s.routing.order == ["vibedream", "wavespeed"]
    p = s.provider_settings()
    vd = p["vibedream"][1]
    assert vd.api_key is not None and vd.api_key.get_secret_value() == "from-toml"
    assert (vd.poll_initial_s, vd.deadline_s) == (0.5, 120)
    ws = p["wavespeed"][1]
    assert isinstance(ws, WaveSpeedSettings)
    assert ws.price_micro_usd_per_image == 15_000 and ws.use_native_sync is False
    kind, acme = p["acme"]
    assert kind == "wavespeed" and acme.api_key is not None
    assert acme.api_key.get_secret_value() == "acme-key"

    monkeypatch.setenv("VIBEDREAM_API_KEY", "from-env")
    vd = Settings().provider_settings()["vibedream"][1]
    assert vd.api_key is not None and vd.api_key.get_secret_value() == "from-env"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("surprise = 1", "surprise"),
        ('[routing]\norder = ["nope"]', "unknown providers"),
        ('[providers.x]\nkind = "martian"', "unknown kind"),
        ("port = 70000", "port"),
    ],
)
def test_bad_config_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, message: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    monkeypatch.setenv("FLUX_PROXY_CONFIG", str(cfg))
    with pytest.raises((ValidationError, ValueError), match=message):
        Settings()


def test_bad_provider_setting_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[providers.vibedream]\npoll_initial_s = -1\n")
    monkeypatch.setenv("FLUX_PROXY_CONFIG", str(cfg))
    with pytest.raises(ValidationError, match=r"(?s)providers\.vibedream.*poll_initial_s"):
        Settings()


def test_missing_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLUX_PROXY_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ValueError, match="no such file"):
        Settings()
