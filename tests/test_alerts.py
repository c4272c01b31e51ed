"""The Prometheus alert rules: valid, each one seen firing and staying quiet in promtool's
unit tests, written against metrics the proxy really exports, and loaded by the Prometheus
that docker-compose.yml starts."""

from __future__ import annotations

import glob
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from providers.simulators import SimulatorServer

from ._debian import debian_binary
from .conftest import make_settings, running_proxy, wait_terminal

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus"
ALERTS = RULES_DIR / "alerts.yml"
ALERTS_TEST = RULES_DIR / "alerts_test.yml"
PROXY_JOB = "flux-proxy"  # the scrape job of the proxy in the compose Prometheus config

# Attached by Prometheus at scrape time, so never in the proxy's own /metrics.
SCRAPE_LABELS = {"instance", "job"}
# PromQL words that are not metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "and", "or", "unless", "offset", "inf", "nan"}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
IDENTIFIER = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
LITERALS = re.compile(r"^[\w/-]+(?:\|[\w/-]+)*$")  # a regex that is just a|b|c

APT_TIMEOUT_S = 300


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a litestar dependency) reads the YAML")
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]
            if "alert" in rule]


@pytest.fixture(scope="module")
def promtool() -> Iterator[str]:
    # promtool comes with Debian's prometheus package.
    yield debian_binary("promtool", ["prometheus"], timeout_s=APT_TIMEOUT_S)


def run_promtool(promtool: str, *args: str | Path) -> str:
    done = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{out}"
    return out


def test_rules_are_valid(promtool: str) -> None:
    out = run_promtool(promtool, "check", "rules", ALERTS)
    assert f"SUCCESS: {len(alert_rules())} rules found" in out, out


def test_every_alert_is_complete() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert set(rule["annotations"]) >= {"summary", "description"}, rule["alert"]
        assert rule.get("for"), f"{rule['alert']} fires on one evaluation"
    # The six, and the proxy being down.
    assert {"FluxProxyBreakerOpen", "FluxProxyPredictionErrorRateHigh",
            "FluxProxyLatencyP95High", "FluxProxyBudgetNearlySpent", "FluxProxyWastedCostHigh",
            "FluxProxyNoSuccessfulPredictions", "FluxProxyDown"} <= set(names)


def test_every_alert_fires_and_stays_quiet_in_the_unit_tests(promtool: str) -> None:
    suite = load_yaml(ALERTS_TEST)
    assert suite["rule_files"] == [ALERTS.name]
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in suite["tests"]:
        for check in test["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
            for alert in check["exp_alerts"]:  # what a receiver would get, in full
                assert alert["exp_labels"]["severity"], check["alertname"]
                assert set(alert["exp_annotations"]) >= {"summary", "description"}
    names = {r["alert"] for r in alert_rules()}
    assert names - fired == set(), "never seen firing"
    assert names - quiet == set(), "never seen quiet"
    out = run_promtool(promtool, "test", "rules", ALERTS_TEST)
    assert "SUCCESS" in out, out


def selectors(expr: str) -> tuple[dict[str, list[tuple[str, str, str]]], set[str], set[str]]:
    """A PromQL expression's metrics (each with its label matchers), the labels it groups
    or matches on, and every other bare name in it (metrics without braces)."""
    matched: dict[str, list[tuple[str, str, str]]] = {}
    for name, body in SELECTOR.findall(expr):
        matched.setdefault(name, []).extend(MATCHER.findall(body))
    grouping = {label.strip() for group in GROUPING.findall(expr)
                for label in group.split(",") if label.strip()}
    bare = STRING.sub('""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)  # matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges
    bare = GROUPING.sub("", bare)  # grouping labels
    names = {n for n in IDENTIFIER.findall(bare) if n.lower() not in KEYWORDS}
    return matched, grouping, names


async def test_alerts_use_only_exported_metrics(
    tmp_path: Path, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer
) -> None:
    settings = make_settings(tmp_path, {"wavespeed": wavespeed_sim, "vibedream": vibedream_sim},
                             auth_enabled=True, admin_key="admin-secret")
    async with running_proxy(settings) as c:
        # A key with a budget (the budget gauges) that spends (the cost by key).
        created = await c.post("/admin/keys", json={"name": "alerts", "budget_usd": "5"},
                               headers={"Authorization": "Bearer admin-secret"})
        assert created.status_code == 201, created.text
        c.headers["Authorization"] = f"Bearer {created.json()['key']}"
        r = await c.post("/v1/predictions", json={"prompt": "a lighthouse", "size": "512*512"})
        assert r.status_code == 202, r.text
        assert (await wait_terminal(c, r.json()["id"]))["status"] == "completed"
        for probe in ("/healthz", "/readyz"):  # the 5xx ratio leaves these out by name
            assert (await c.get(probe)).status_code == 200
        exposition = (await c.get("/metrics")).text

    # Sample names as exported (`x_bucket`, `x_count`, `x_total`, ...) -> label -> values.
    exported: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = exported.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    # Prometheus's own: one per scrape target.
    exported["up"] = {"job": {PROXY_JOB}, "instance": set()}

    rules = alert_rules()
    for rule in rules:
        expr = rule["expr"]
        matched, grouping, names = selectors(expr)
        assert any(n.startswith("flux_proxy_") for n in names) or rule["alert"] == \
            "FluxProxyDown", rule["alert"]
        in_expr: set[str] = set(SCRAPE_LABELS)
        for name in names:
            assert name in exported, f"{rule['alert']}: {name} is not exported by the proxy"
            labels = exported[name]
            in_expr |= set(labels)
            for label, op, value in matched.get(name, []):
                assert label in labels or label in SCRAPE_LABELS, \
                    f"{rule['alert']}: {name} has no label {label}"
                # A value (or a|b|c) that names a value the proxy never writes matches
                # nothing, silently: status="complete" would make an alert never fire.
                if label in labels and (op in ("=", "!=") or LITERALS.match(value)):
                    for one in value.split("|") if op in ("=~", "!~") else [value]:
                        assert one in labels[label], \
                            f"{rule['alert']}: {name}{{{label}}} is never {one!r}"
        unknown = grouping - in_expr
        assert not unknown, f"{rule['alert']}: grouping by unknown label(s) {unknown}"


def test_the_selector_parser_sees_every_metric() -> None:
    """The check above is only as good as its reading of PromQL."""
    matched, grouping, names = selectors(
        'sum by (provider, le) (rate(a_total{x="1", y=~"p|q"}[5m])) / on(provider) b '
        'and histogram_quantile(0.9, c_bucket) > bool 0.5 or up{job="j"} == 0')
    assert set(matched) == {"a_total", "up"}
    assert matched["a_total"] == [("x", "=", "1"), ("y", "=~", "p|q")]
    assert grouping == {"provider", "le"}
    assert names == {"a_total", "b", "c_bucket", "up"}


def container_to_host(mounts: dict[str, str], path: str) -> Path | None:
    """Where a path inside the Prometheus container is in this checkout (None: not mounted)."""
    inside = PurePosixPath(path)
    for target, source in sorted(mounts.items(), key=lambda m: -len(m[0])):
        try:
            rest = inside.relative_to(target)
        except ValueError:
            continue
        return (ROOT / source).joinpath(rest).resolve()
    return None


def test_compose_prometheus_loads_the_rules(promtool: str, tmp_path: Path) -> None:
    service = load_yaml(ROOT / "docker-compose.yml")["services"]["prometheus"]
    mounts: dict[str, str] = {}
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("."):  # bind mounts; named volumes are the data
            mounts[target] = source
    [config_arg] = [a for a in service["command"] if a.startswith("--config.file=")]
    config_inside = config_arg.removeprefix("--config.file=")
    config_host = container_to_host(mounts, config_inside)
    assert config_host is not None and config_host.is_file(), f"{config_inside} is not mounted"

    config = load_yaml(config_host)
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs[PROXY_JOB]["static_configs"][0]["targets"] == ["proxy:8080"]

    # rule_files are relative to the config file's folder, as Prometheus reads them
    # in the container; each one must be mounted, and match exactly the alert rules.
    config_dir = PurePosixPath(config_inside).parent
    loaded: set[Path] = set()
    rewritten = []
    for pattern in config["rule_files"]:
        host = container_to_host(mounts, str(config_dir / pattern))
        assert host is not None, f"rule file {pattern} is not mounted in the container"
        loaded |= {Path(p).resolve() for p in glob.glob(str(host))}
        rewritten.append(str(host))
    assert loaded == {ALERTS.resolve()}  # not alerts_test.yml, which is not rules

    # promtool on the same config with this checkout's paths for the container's.
    config["rule_files"] = rewritten
    yaml = pytest.importorskip("yaml")
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    out = run_promtool(promtool, "check", "config", copy)
    assert f"SUCCESS: {len(alert_rules())} rules found" in out, out
