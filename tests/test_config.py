"""Settings: env vars named by the seeds, FLUX_PROXY_* vars, the TOML file, precedence."""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import SecretStr, ValidationError

from providers.registry import settings_class
from providers.vibedream import VibeDreamSettings
from providers.wavespeed import WaveSpeedSettings
from proxy.app import build_providers
from proxy.config import NOT_SETTINGS, TEST_RUN_VARIABLES, ConfigError, Settings


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
        # unknown keys are refused at any depth, naming the closest setting
        ("[routing.breaker]\ncooldwn_s = 1", r"unknown setting routing\.breaker\.cooldwn_s; "
                                             r"did you mean routing\.breaker\.cooldown_s\?"),
        ("[providers.vibedream]\nasset_host = []",
         r"providers\.vibedream\.asset_host .*did you mean providers\.vibedream\.asset_hosts"),
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


# --------------------------------------------------------------------------- the environment


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("FLUX_PROXY_PROT", "FLUX_PROXY_PORT"),
        ("FLUX_PROXY_ADMINKEY", "FLUX_PROXY_ADMIN_KEY"),
        ("FLUX_PROXY_ROUTING__BREAKER__COOLDOWN", "FLUX_PROXY_ROUTING__BREAKER__COOLDOWN_S"),
        ("FLUX_PROXY_ROUTING__ORDERS", "FLUX_PROXY_ROUTING__ORDER"),
        ("FLUX_PROXY_PROVIDERS__VIBEDREAM__ASSET_HOST",
         "FLUX_PROXY_PROVIDERS__VIBEDREAM__ASSET_HOSTS"),
        ("FLUX_PROXY_PROVIDERS__VIBEDRAEM__API_KEY", "FLUX_PROXY_PROVIDERS__VIBEDREAM__API_KEY"),
        # a setting of another kind of provider
        ("FLUX_PROXY_PROVIDERS__VIBEDREAM__PRICE_MICRO_USD_PER_IMAGE",
         "FLUX_PROXY_PROVIDERS__WAVESPEED__PRICE_MICRO_USD_PER_IMAGE"),
        ("FLUX_PROXY_PORT__NUMBER", "FLUX_PROXY_PORT"),
    ],
)
def test_an_unknown_variable_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, closest: str
) -> None:
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ConfigError) as caught:
        Settings()
    message = str(caught.value)
    assert f"unknown setting {variable} " in message
    assert message.endswith(f"did you mean {closest}?")
    assert "\n" not in message


def test_unknown_keys_inside_a_json_variable_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_PROXY_ROUTING__BREAKER", '{"cooldwn_s": 5}')
    with pytest.raises(ConfigError, match=r"FLUX_PROXY_ROUTING__BREAKER: unknown setting "
                                          r"routing\.breaker\.cooldwn_s"):
        Settings()


def test_variables_that_are_not_proxy_settings_are_allowed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = tmp_path / "flux.toml"
    cfg.write_text("port = 7001\n")
    allowed = {
        "FLUX_PROXY_SKIP_PG": "1", "FLUX_PROXY_TEST_PG_URL": "postgresql://127.0.0.1/test",
        "FLUX_PROXY_CONFIG": str(cfg),
        # the worker's own prefix: its settings are not the proxy's business
        "FLUX_WORKER_TOKEN": "t", "FLUX_WORKER_MODEL_PATH": "/models/x", "FLUX_WORKER_PORT": "1",
        "VIBEDREAM_API_KEY": "vd", "WAVESPEED_API_KEY": "ws",
        "LOCAL_WORKER_URLS": "http://10.0.0.5:8090", "LOCAL_API_KEY": "lk",
    }
    for name, value in allowed.items():
        monkeypatch.setenv(name, value)
    assert TEST_RUN_VARIABLES | {"FLUX_PROXY_CONFIG"} <= NOT_SETTINGS
    s = Settings()
    assert s.port == 7001
    assert s.provider_settings()["local"][1].worker_urls == ["http://10.0.0.5:8090"]  # type: ignore[attr-defined]


def test_nested_provider_settings_from_env_reach_the_built_providers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VIBEDREAM_API_KEY", "vd-key")
    monkeypatch.setenv("WAVESPEED_API_KEY", "ws-key")
    monkeypatch.setenv("FLUX_PROXY_PROVIDERS__VIBEDREAM__ASSET_HOSTS",
                       '["cdn.example.com", "*.img.example"]')  # JSON
    monkeypatch.setenv("FLUX_PROXY_PROVIDERS__VIBEDREAM__POLL_MAX_S", "0.5")
    monkeypatch.setenv("FLUX_PROXY_PROVIDERS__WAVESPEED__ASSET_HOSTS",
                       "a.example, b.example")  # comma-separated
    monkeypatch.setenv("FLUX_PROXY_PROVIDERS__WAVESPEED__USE_NATIVE_SYNC", "false")
    # A second account, declared by the environment alone; it reads WS2_API_KEY.
    monkeypatch.setenv("FLUX_PROXY_PROVIDERS__WS2__KIND", "wavespeed")
    monkeypatch.setenv("FLUX_PROXY_PROVIDERS__WS2__PRICE_MICRO_USD_PER_IMAGE", "15000")
    monkeypatch.setenv("WS2_API_KEY", "ws2-key")

    providers, disabled = build_providers(Settings())
    vd, ws, ws2 = providers["vibedream"].settings, providers["wavespeed"].settings, \
        providers["ws2"].settings
    assert vd.asset_hosts == ["cdn.example.com", "*.img.example"] and vd.poll_max_s == 0.5
    assert ws.asset_hosts == ["a.example", "b.example"]
    assert isinstance(ws, WaveSpeedSettings) and ws.use_native_sync is False
    assert isinstance(ws2, WaveSpeedSettings) and ws2.price_micro_usd_per_image == 15_000
    assert ws2.api_key is not None and ws2.api_key.get_secret_value() == "ws2-key"
    assert "local" in disabled


def test_routing_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_PROXY_ROUTING__ORDER", "vibedream, wavespeed")
    monkeypatch.setenv("FLUX_PROXY_ROUTING__BREAKER__COOLDOWN_S", "5")
    monkeypatch.setenv("FLUX_PROXY_ROUTING__BREAKER", '{"failure_threshold": 2, "cooldown_s": 9}')
    monkeypatch.setenv("FLUX_PROXY_ROUTING__ROUTES",
                       '{"flux-dev": {"strategy": "weighted", "weights": {"wavespeed": 3}}}')
    routing = Settings().routing
    assert routing.order == ["vibedream", "wavespeed"]
    # the variable naming the setting refines the JSON table, whatever the order
    assert (routing.breaker.failure_threshold, routing.breaker.cooldown_s) == (2, 5.0)
    route = routing.route_for("flux-dev")
    assert route.strategy == "weighted" and route.weights == {"wavespeed": 3.0}


def test_a_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_PROXY_ROUTING__ROUTES", "not json")
    with pytest.raises(ConfigError, match="FLUX_PROXY_ROUTING__ROUTES: expected a JSON object"):
        Settings()


README = Path(__file__).parent.parent / "README.md"


def documented_settings() -> list[tuple[str, ...]]:
    """Every setting the README's configuration tables name, as a path."""
    text = README.read_text()
    config = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    local = text.split("The proxy's `local` provider", 1)[1].split("\n\n", 2)[1]
    top, per_provider = config.split("| setting |")[1:3]
    paths: list[tuple[str, ...]] = []
    for table, kinds in ((top, ()), (per_provider, ("vibedream", "wavespeed")),
                         (local, ("local",))):
        for line in table.splitlines()[2:]:  # past the header and |---|
            if not line.startswith("| "):
                continue
            cell = line.split("|")[1].strip()
            names = re.findall(r"`([^`]+)`", cell)
            if not kinds:  # `routing.breaker.cooldown_s` / `half_open_probes`: same table
                first = tuple(names[0].replace("<model>", "flux-dev").split("."))
                paths += [first, *[(*first[:-1], n) for n in names[1:]]]
                continue
            # "WaveSpeed `use_native_sync`": that kind only
            only = [k for k in kinds if cell.lower().startswith(k)]
            paths += [("providers", k, n) for k in only or kinds for n in names]
    return paths


def test_the_readme_documents_the_settings_this_test_reads() -> None:
    paths = documented_settings()
    assert ("port",) in paths and ("routing", "breaker", "min_calls") in paths
    assert ("providers", "wavespeed", "sync_read_timeout_s") in paths
    assert ("providers", "vibedream", "sync_read_timeout_s") not in paths
    assert ("providers", "local", "gpu_hourly_usd") in paths and len(paths) > 60


def _other_value(default: Any, annotation: Any) -> tuple[str, Any]:
    """A value unlike the default, as the environment spells it, and as read back."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        choice = next(a for a in args if a != default)
        return choice, choice
    if default is None or isinstance(default, SecretStr):
        return "s3cret-value", "s3cret-value"
    if isinstance(default, bool):
        return str(not default).lower(), not default
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        return str(default + 0.25), default + 0.25
    if isinstance(default, Decimal):
        return str(default + 1), default + 1
    if isinstance(default, str):
        return "http://10.0.0.9:1", "http://10.0.0.9:1"
    if isinstance(default, list):
        new = ["vibedream", "wavespeed"] if default == ["local", "wavespeed", "vibedream"] \
            else [*default, "flux-schnell" if default == ["flux-dev"] else "http://10.0.0.9:1"]
        return ",".join(new), new
    raise AssertionError(f"no test value for {default!r}")


def _read(obj: Any, path: Sequence[str]) -> Any:
    for key in path:
        obj = obj[key] if isinstance(obj, dict) else getattr(obj, key)
    return obj.get_secret_value() if isinstance(obj, SecretStr) else obj


@pytest.mark.parametrize("path", documented_settings(), ids=".".join)
def test_every_documented_setting_can_be_set_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, path: tuple[str, ...]
) -> None:
    variable = "FLUX_PROXY_" + "__".join(path).upper()
    if path[:2] == ("routing", "routes"):
        monkeypatch.setenv(variable, '{"strategy": "cheapest", "hedge": true}')
        route = Settings().routing.routes["flux-dev"]
        assert (route.strategy, route.hedge) == ("cheapest", True)
        return
    if path[0] == "providers":
        kind, name = path[1], path[2]
        field = settings_class(kind).model_fields[name]
        default = getattr(settings_class(kind).model_validate({}), name)
        raw, expected = _other_value(default, field.annotation)
        monkeypatch.setenv(variable, raw)
        assert _read(Settings().provider_settings()[kind][1], [name]) == expected
        return
    owner: Any = Settings
    for key in path[:-1]:
        owner = owner.model_fields[key].annotation
    field = owner.model_fields[path[-1]]
    default = _read(Settings(), path)
    raw, expected = _other_value(default, field.annotation)
    if path == ("models",):
        monkeypatch.setenv(variable, '["flux-dev", "flux-schnell"]')  # JSON works too
    else:
        monkeypatch.setenv(variable, raw)
    assert _read(Settings(), path) == expected
