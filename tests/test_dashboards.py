"""The Grafana dashboard and the compose stack agree with what the proxy really exports."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from providers.simulators import SimulatorServer
from proxy import metrics
from proxy.cli import main as cli_main
from proxy.config import Settings

from .conftest import make_settings, running_proxy, wait_terminal

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "flux-proxy.json"
DASHBOARDS_DIR = "/var/lib/grafana/dashboards"

METRIC = re.compile(r"\b(flux_proxy_[a-zA-Z0-9_]+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Attached by Prometheus at scrape time, so never in the proxy's own /metrics.
SCRAPE_LABELS = {"instance", "job"}

def load_yaml(*parts: str) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a litestar dependency) reads the YAML")
    return yaml.safe_load(ROOT.joinpath(*parts).read_text())


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and query variables."""
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_every_panel_is_complete() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "provider", "model"} <= set(variables)
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "prometheus"  # the provisioned uid
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["title"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"] == panel["datasource"], panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]


async def test_dashboard_uses_only_exported_metrics(
    tmp_path: Path, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer
) -> None:
    # One failover and one hedge, so the routing metrics have samples too.
    settings = make_settings(
        tmp_path, {"wavespeed": wavespeed_sim, "vibedream": vibedream_sim},
        routing={"order": ["wavespeed", "vibedream"],
                 "routes": {"flux-dev": {"hedge": True, "hedge_delay_s": 0.1}}},
        auth_enabled=True, admin_key="admin-secret",
    )
    async with running_proxy(settings) as c:
        # A key with a budget, so the per-key metrics have samples too.
        created = await c.post("/admin/keys", json={"name": "dash", "budget_usd": "5"},
                               headers={"Authorization": "Bearer admin-secret"})
        c.headers["Authorization"] = f"Bearer {created.json()['key']}"
        wavespeed_sim.config.error_rate = 1.0
        r = await c.post("/v1/predictions", json={"prompt": "a lighthouse", "size": "512*512"})
        assert r.status_code == 202, r.text
        assert (await wait_terminal(c, r.json()["id"]))["status"] == "completed"
        wavespeed_sim.config.error_rate = 0.0
        wavespeed_sim.config.job_latency_s = 1.0
        r = await c.post("/v1/predictions", json={"prompt": "a lighthouse", "size": "512*512"})
        assert (await wait_terminal(c, r.json()["id"]))["provider"] == "vibedream"
        exposition = (await c.get("/metrics")).text

    # Sample names as exported (`x_bucket`, `x_count`, `x_total`, ...) -> their label names.
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)

    used: set[str] = set()
    for expr in queries(dashboard()):
        names = METRIC.findall(expr)
        assert names, f"no flux_proxy_ metric in {expr!r}"
        in_expr: set[str] = set()
        for name, matchers in names:
            assert name in labels, f"{name} (in {expr!r}) is not exported by the proxy"
            used.add(name)
            in_expr |= labels[name]
            unknown = set(MATCHER.findall(matchers)) - labels[name]
            assert not unknown, f"{name} has no label(s) {unknown} (in {expr!r})"
        for group in GROUPING.findall(expr):
            grouped = {g.strip() for g in group.split(",") if g.strip()}
            unknown = grouped - in_expr - SCRAPE_LABELS
            assert not unknown, f"grouping by unknown label(s) {unknown} in {expr!r}"

    # Every metric proxy/metrics.py defines has a place on the dashboard.
    defined = {m.describe()[0].name for m in vars(metrics).values()
               if isinstance(m, MetricWrapperBase)}
    assert len(defined) >= 7
    shown = {n for n in defined if any(u == n or u.startswith(n + "_") for u in used)}
    assert defined - shown == set()


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    providers = load_yaml("grafana", "provisioning", "dashboards", "flux-proxy.yml")["providers"]
    assert [p["options"]["path"] for p in providers] == [DASHBOARDS_DIR]
    assert all(p["type"] == "file" for p in providers)
    [ds] = load_yaml("grafana", "provisioning", "datasources", "prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"

    grafana = load_yaml("docker-compose.yml")["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[DASHBOARDS_DIR] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def dockerfile_cmd() -> list[str]:
    [line] = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines()
              if ln.startswith("CMD ")]
    cmd: list[str] = json.loads(line.removeprefix("CMD "))
    return cmd


def test_compose_matches_the_dockerfile() -> None:
    compose = load_yaml("docker-compose.yml")["services"]
    proxy = compose["proxy"]
    cmd = dockerfile_cmd()
    assert proxy["build"] == "."
    assert proxy.get("command", cmd) == cmd
    port = cmd[cmd.index("--port") + 1]
    assert f"EXPOSE {port}" in (ROOT / "Dockerfile").read_text()
    assert any(p.endswith(f":{port}") for p in proxy["ports"])
    assert f"127.0.0.1:{port}/healthz" in " ".join(proxy["healthcheck"]["test"])

    env = proxy["environment"]
    assert env["FLUX_PROXY_DATABASE_URL"] == (
        "postgresql+asyncpg://flux:flux@postgres:5432/flux"
    )
    assert env["VIBEDREAM_API_KEY"] == "${VIBEDREAM_API_KEY:-}"
    assert env["WAVESPEED_API_KEY"] == "${WAVESPEED_API_KEY:-}"
    assert proxy["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in compose["postgres"]

    [job] = [j for j in load_yaml("deploy", "prometheus.yml")["scrape_configs"]
             if j["job_name"] == "flux-proxy"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"proxy:{port}"]

    # `flux-proxy` is the console script, and both subcommands exist.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[cmd[0]] == "proxy.cli:main"
    assert {cmd[1], "simulate"} <= set(cli_main.commands)


def test_sim_profile_points_the_proxy_at_the_simulators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compose = load_yaml("docker-compose.yml")["services"]
    override = load_yaml("docker-compose.sim.yml")["services"]["proxy"]
    config_path = override["environment"]["FLUX_PROXY_CONFIG"]
    assert f"./deploy/sim.toml:{config_path}:ro" in override["volumes"]

    # The proxy as the override configures it (environment beats the TOML file).
    monkeypatch.setenv("FLUX_PROXY_CONFIG", str(ROOT / "deploy" / "sim.toml"))
    for name in ("VIBEDREAM_API_KEY", "WAVESPEED_API_KEY"):
        monkeypatch.setenv(name, override["environment"][name])
    configured = Settings().provider_settings()

    for kind in ("vibedream", "wavespeed"):
        service = f"sim-{kind}"
        sim = compose[service]
        assert sim["profiles"] == ["sim"] and sim["build"] == "."
        args = shlex.split(sim["command"]) if isinstance(sim["command"], str) else sim["command"]
        assert args[:3] == [dockerfile_cmd()[0], "simulate", kind]
        port = args[args.index("--port") + 1]
        assert args[args.index("--host") + 1] == "0.0.0.0"
        assert f"127.0.0.1:{port}/_sim/health" in " ".join(sim["healthcheck"]["test"])
        assert override["depends_on"][service]["condition"] == "service_healthy"

        _, settings = configured[kind]
        assert settings.base_url == f"http://{service}:{port}"
        assert settings.asset_hosts == [f"{service}:{port}"]
        assert settings.allow_private_asset_hosts
        assert settings.api_key is not None
        assert settings.api_key.get_secret_value() == "sim-key"  # the simulators' default
