"""The Grafana dashboards and the compose stack agree with what the proxy and the local
worker really export. (tests/test_prometheus_live.py runs every panel's query on a real
Prometheus; this file checks the JSON and the names without one.)"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import anyio
import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from providers.simulators import SimulatorServer
from proxy import metrics
from proxy.cli import main as cli_main
from proxy.config import Settings
from worker.app import create_worker_app
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings
from worker.testing import FakeEngine

from .conftest import make_settings, running_proxy, wait_terminal

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
PROXY, WORKER = "flux-proxy", "flux-worker"
DASHBOARDS_DIR = "/var/lib/grafana/dashboards"

METRIC = re.compile(r"\b(flux_(?:proxy|worker)_[a-zA-Z0-9_]+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$")
# Attached by Prometheus at scrape time, so never in the proxy's own /metrics.
SCRAPE_LABELS = {"instance", "job"}


def load_yaml(*parts: str) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a litestar dependency) reads the YAML")
    return yaml.safe_load(ROOT.joinpath(*parts).read_text())


def dashboard(name: str = PROXY) -> dict[str, Any]:
    return json.loads((DASHBOARD_DIR / f"{name}.json").read_text())


def all_dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def queries(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and query variables."""
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def divisors(expr: str) -> list[str]:
    """What each ` / ` divides by: a number, or the parenthesised group after it."""
    out = []
    for match in re.finditer(r" / ", expr):
        rest = expr[match.end():]
        if not rest.startswith("("):
            out.append(re.match(r"[^ )]*", rest).group(0))  # type: ignore[union-attr]
            continue
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                out.append(rest[: i + 1])
                break
    return out


def test_the_dashboards_are_there() -> None:
    assert set(all_dashboards()) == {PROXY, WORKER}
    uids = [d["uid"] for d in all_dashboards().values()]
    assert sorted(uids) == sorted({PROXY, WORKER})


@pytest.mark.parametrize("name", [PROXY, WORKER])
def test_every_panel_is_complete(name: str) -> None:
    dash = dashboard(name)
    assert dash["title"] and dash["description"] and dash["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    expected = {"datasource", "provider", "model", "key"} if name == PROXY else {
        "datasource", "instance"}
    assert expected <= set(variables)
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "prometheus"  # the provisioned uid
    for var in variables.values():
        assert var.get("description"), var["name"]
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert var["includeAll"] and var["allValue"] == ".*", var["name"]
            assert LABEL_VALUES.match(var["query"]["query"]), var["name"]
            assert var["definition"] == var["query"]["query"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in panels:
        title = panel["title"]
        assert title, panel
        assert len(panel.get("description", "")) >= 40, f"{title}: say what it shows"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], title
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.strip() and target["refId"], title
            assert target["datasource"] == panel["datasource"], title
            # One rule for idle series: a ratio divides by a guarded denominator and a
            # quantile drops its NaN, so an idle proxy shows no data, never NaN noise.
            for divisor in divisors(expr):
                assert re.fullmatch(r"[0-9.e]+", divisor) or divisor.endswith("> 0)") \
                    or "clamp_min(" in divisor, f"{title}: unguarded / {divisor} in {expr}"
            if "histogram_quantile(" in expr:
                assert expr.rstrip().endswith(">= 0"), f"{title}: quantile NaN in {expr}"
            # Series from several processes and replicas add up (or take the worst).
            if "rate(" in expr or "increase(" in expr:
                assert re.match(r"^(1 - |\()?(sum|avg|max|min|histogram_quantile)\b",
                                expr), f"{title}: aggregate over instances: {expr}"
        assert panel["fieldConfig"]["defaults"].get("unit"), title


def exported_labels(exposition: str) -> dict[str, set[str]]:
    """Sample names as exported (`x_bucket`, `x_count`, `x_total`, ...) -> label names."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def check_names(dash: dict[str, Any], labels: dict[str, set[str]], defined: set[str]) -> None:
    """Every metric a query uses is exported with the labels it uses; every defined
    metric is used by some panel."""
    used: set[str] = set()
    for expr in queries(dash):
        names = METRIC.findall(expr)
        assert names, f"no flux_ metric in {expr!r}"
        in_expr: set[str] = set()
        for name, matchers in names:
            assert name in labels, f"{name} (in {expr!r}) is not exported"
            used.add(name)
            in_expr |= labels[name]
            unknown = set(MATCHER.findall(matchers)) - labels[name] - SCRAPE_LABELS
            assert not unknown, f"{name} has no label(s) {unknown} (in {expr!r})"
        for group in GROUPING.findall(expr):
            grouped = {g.strip() for g in group.split(",") if g.strip()}
            unknown = grouped - in_expr - SCRAPE_LABELS
            assert not unknown, f"grouping by unknown label(s) {unknown} in {expr!r}"
        variable = LABEL_VALUES.match(expr)
        if variable:
            assert variable.group(2) in in_expr | SCRAPE_LABELS, expr

    assert len(defined) >= 7
    shown = {n for n in defined if any(u == n or u.startswith(n + "_") for u in used)}
    assert defined - shown == set(), "metrics without a panel"


async def test_proxy_dashboard_uses_only_exported_metrics(
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

    defined = {next(iter(m.describe())).name for m in vars(metrics).values()
               if isinstance(m, MetricWrapperBase)}
    check_names(dashboard(PROXY), exported_labels(exposition), defined)


async def test_worker_dashboard_uses_only_exported_metrics() -> None:
    # One job at a time and one queued at most: of three quick submits one is refused,
    # so the labelled counters (jobs by status, batches, rejections) have samples.
    app = create_worker_app(WorkerSettings(safety_checker="none", warmup=False,
                                           batch_window_ms=0, max_batch_size=1, max_queue=1,
                                           log_level="warning"),
                            engine=FakeEngine(step_s=0.01))
    body = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 20,
            "guidance_scale": 3.5, "num_images": 1, "seed": 7, "output_format": "png"}
    async with AsyncTestClient(app, base_url="http://worker.test") as c:
        statuses = [(await c.post("/v1/jobs", json=body)).status_code for _ in range(3)]
        assert 503 in statuses and 202 in statuses
        exposition = ""
        for _ in range(200):  # bounded: the accepted jobs take ~0.2 s each
            exposition = (await c.get("/metrics")).text
            if "flux_worker_queue_depth 0.0" in exposition and \
                    "flux_worker_jobs_running 0.0" in exposition:
                break
            await anyio.sleep(0.02)

    defined = {next(iter(m.describe())).name for m in vars(WorkerMetrics()).values()
               if isinstance(m, MetricWrapperBase)}
    labels = exported_labels(exposition)
    assert 'flux_worker_jobs_total{status="completed"}' in exposition
    check_names(dashboard(WORKER), labels, defined)


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
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    # Both dashboards are files in the mounted folder; the home one is the proxy's.
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{DASHBOARDS_DIR}/{PROXY}.json"
    assert {f"{DASHBOARDS_DIR}/{name}.json" for name in all_dashboards()} == {
        f"{DASHBOARDS_DIR}/{PROXY}.json", f"{DASHBOARDS_DIR}/{WORKER}.json"}
    # Every panel's datasource is the variable that defaults to the provisioned uid.
    for dash in all_dashboards().values():
        [var] = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
        assert var["current"]["value"] == ds["uid"] and var["query"] == ds["type"]


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

    [job] = [j for j in load_yaml("deploy", "prometheus", "prometheus.yml")["scrape_configs"]
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
