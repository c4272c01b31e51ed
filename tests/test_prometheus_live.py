"""The dashboards against a real Prometheus scraping a running proxy and local worker.

A real `prometheus` (the Debian package; installed when missing, skipped with the
reason only where it cannot be) scrapes the proxy (real uvicorn, loopback) and a local
worker (the real worker app on the fake engine) every second while real predictions go
through the simulators: successes, an NSFW image, one on the local worker, a hedge, a
moderated one, a failover, a retry on the same provider after a 429, and a refusal (402,
budget). Then every `expr` of every dashboard panel is evaluated through the Prometheus
HTTP API and must return data without error, and the key figures must match the
proxy's own records: cost (the spend API), failovers and retries (the attempt rows),
success ratio, images and NSFW flags (the predictions). Dashboards cannot rot after that.

The proxy runs in this test process, so its counters may hold earlier tests' counts:
exact comparisons use the increase of the raw counters between a baseline query (after
the first scrape, before the first prediction) and the end. The dashboards' own range
figures use increase(), which Prometheus extrapolates to the window's edges; those are
checked within that extrapolation.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from providers.simulators import SimulatorServer
from worker.app import create_worker_app
from worker.settings import WorkerSettings
from worker.testing import FakeEngine

from ._debian import debian_binary
from ._serve import free_port, serving, serving_app
from .conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
ADMIN = "live-admin-key"
SCRAPE_S = 1.0
INSTALL_TIMEOUT_S = 300


# --------------------------------------------------------------------------- Prometheus


def prometheus_binary() -> str:
    """`prometheus`, installed from the Debian package when missing (bounded)."""
    return debian_binary("prometheus", ["prometheus"], timeout_s=INSTALL_TIMEOUT_S)


@contextmanager
def prometheus(tmp_path: Path, targets: dict[str, str]) -> Iterator[str]:
    """Prometheus on a free loopback port scraping `targets` (job -> host:port): its URL."""
    binary = prometheus_binary()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "scrape_timeout": "900ms",
                   "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": job, "metrics_path": "/metrics",
                            "static_configs": [{"targets": [target]}]}
                           for job, target in targets.items()],
    }))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log.read_text()}"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Prom:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        r = self.http.get("/api/v1/query", params=params)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"{body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str, at: float | None = None) -> float:
        """The single value of `expr` (0 when it has no series)."""
        result = self.query(expr, at)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else 0.0

    def by(self, expr: str, *labels: str, at: float | None = None
           ) -> dict[tuple[str, ...], float]:
        return {tuple(s["metric"].get(k, "") for k in labels): float(s["value"][1])
                for s in self.query(expr, at)}

    def wait(self, expr: str, ok: Any, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        for _ in range(int(timeout_s / 0.2) + 1):
            last = self.query(expr)
            if ok(last):
                return
            assert time.monotonic() < deadline, f"{expr}: still {last}"
            time.sleep(0.2)
        raise AssertionError(f"{expr}: still {last}")


# --------------------------------------------------------------------------- the worker


@contextmanager
def worker_server(engine: FakeEngine) -> Iterator[str]:
    """The local worker app (fake engine: no torch) under uvicorn on loopback."""
    settings = WorkerSettings(safety_checker="none", warmup=False, batch_window_ms=0,
                              max_batch_size=1, max_queue=1, log_level="warning")
    with serving_app(create_worker_app(settings, engine=engine), "worker") as url:
        yield url


def fill_the_worker_queue(url: str) -> None:
    """Three slow jobs straight to the worker (one at a time, one queued at most): at
    least one is refused queue_full; wait until the accepted ones are done."""
    body = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 50,
            "guidance_scale": 3.5, "num_images": 1, "seed": 7, "output_format": "png"}
    accepted, refused = [], 0
    with httpx.Client(base_url=url, timeout=10) as c:
        for _ in range(3):
            r = c.post("/v1/jobs", json=body)
            if r.status_code == 202:
                accepted.append(r.json()["id"])
            else:
                assert r.status_code == 503, r.text
                refused += 1
        assert refused >= 1
        deadline = time.monotonic() + 15
        for job in accepted:
            while c.get(f"/v1/jobs/{job}").json()["status"] not in (
                    "completed", "failed", "canceled"):
                assert time.monotonic() < deadline, "worker jobs did not finish"
                time.sleep(0.05)


# --------------------------------------------------------------------------- dashboards


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of every panel."""
    out = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                out.append((path.stem, panel["title"], t["expr"]))
    return out


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard, variable name, query) for every query variable."""
    out = []
    for path in DASHBOARDS:
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] == "query":
                q = var["query"]
                out.append((path.stem, var["name"], q["query"] if isinstance(q, dict) else q))
    return out


def substitute(expr: str, range_s: int) -> str:
    """Grafana's variables as the dashboard's defaults (All) would set them."""
    for name in ("provider", "model", "key", "instance"):
        expr = expr.replace(f"${name}", ".*")
    return expr.replace("$__rate_interval", "1m").replace("$__range", f"{range_s}s")


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def failovers_and_retries(attempts: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], int]:
    """From one prediction's attempt rows: (from, to) of each failover, and the number of
    retries. Each is an attempt started after the previous one had failed, on another
    provider (failover) or the same one (retry); a hedge starts while its primary runs."""
    pairs, retries = [], 0
    for prev, cur in itertools.pairwise(attempts):
        if prev["status"] != "failed" or prev["completed_at"] is None:
            continue
        if when(cur["created_at"]) < when(prev["completed_at"]):
            continue  # a hedge, not a move
        if cur["provider"] == prev["provider"]:
            retries += 1
        else:
            pairs.append((prev["provider"], cur["provider"]))
    return pairs, retries


# --------------------------------------------------------------------------- the test


def test_every_dashboard_query_returns_data_and_agrees_with_the_proxy(
    tmp_path: Path, wavespeed_sim: SimulatorServer, vibedream_sim: SimulatorServer
) -> None:
    started = time.time()
    vibedream_sim.config.retry_after_s = 0.2  # the 429 retry waits this long
    with worker_server(FakeEngine(step_s=0.01)) as worker_url:
        settings = make_settings(
            tmp_path, {"wavespeed": wavespeed_sim, "vibedream": vibedream_sim},
            # Two attempts at most: the 429 is retried once, then the prediction fails.
            routing={"order": ["wavespeed", "vibedream", "local"], "max_attempts": 2,
                     "routes": {"flux-dev": {"hedge": True, "hedge_delay_s": 0.3}}},
            auth_enabled=True, admin_key=ADMIN,
        )
        settings.providers["local"] = {"worker_urls": [worker_url], "read_timeout_s": 5,
                                       "poll_initial_s": 0.02, "poll_max_s": 0.1}
        with serving(settings) as base, prometheus(tmp_path, {
                "flux-proxy": base.removeprefix("http://"),
                "flux-worker": worker_url.removeprefix("http://")}) as prom_url:
            prom = Prom(prom_url)
            prom.wait('up{job=~"flux-proxy|flux-worker"} == 1', lambda r: len(r) == 2)
            prom.wait("flux_proxy_cost_micro_usd_total", bool)
            baseline = time.time()
            counters = ("sum(flux_proxy_cost_micro_usd_total)", "sum(flux_proxy_failovers_total)",
                        "sum(flux_proxy_retries_total)", "sum(flux_proxy_images_total)",
                        "sum(flux_proxy_nsfw_images_total)",
                        'sum(flux_proxy_predictions_total{status="completed"})',
                        "sum(flux_proxy_predictions_total)")
            before = {q: prom.value(q, baseline) for q in counters}
            failovers_before = prom.by("sum by (from, to) (flux_proxy_failovers_total)",
                                       "from", "to", at=baseline)
            records = drive(base, wavespeed_sim, vibedream_sim, worker_url)
            done = time.time()
            # A scrape of each target after everything ended.
            prom.wait('min(timestamp(up{job=~"flux-proxy|flux-worker"}))',
                      lambda r: bool(r) and float(r[0]["value"][1]) > done + 0.05)
            at = time.time()
            range_s = math.ceil(at - started) + 5

            # Every panel query and every variable query returns data, without error.
            failures = []
            for dash, title, expr in panel_queries():
                try:
                    result = prom.query(substitute(expr, range_s), at)
                except AssertionError as exc:
                    failures.append(f"{dash} / {title}: {exc}\n    {expr}")
                    continue
                if not result:
                    failures.append(f"{dash} / {title}: no data\n    {expr}")
                elif all(math.isnan(float(s["value"][1])) for s in result):
                    failures.append(f"{dash} / {title}: only NaN\n    {expr}")
            values: dict[str, set[str]] = {}
            for dash, name, query in variable_queries():
                selector, _, label = query.removeprefix("label_values(").removesuffix(
                    ")").rpartition(",")
                r = prom.http.get(f"/api/v1/label/{label.strip()}/values", params={
                    "match[]": selector.strip(), "start": f"{started:.0f}", "end": f"{at:.3f}"})
                values[name] = set(r.json().get("data") or [])
                if not values[name]:
                    failures.append(f"{dash} / variable {name}: no values ({r.text[:200]})")
            assert not failures, "\n".join(failures)
            assert {"wavespeed", "vibedream", "local"} <= values["provider"]
            assert records["key_name"] in values["key"]

            # The key figures agree with the proxy's own records.
            delta = {q: prom.value(q, at) - before[q] for q in counters}
            assert delta["sum(flux_proxy_cost_micro_usd_total)"] == records["cost_micro_usd"]
            key_cost = prom.value(
                f'sum(flux_proxy_cost_usd_total{{key_name="{records["key_name"]}"}})', at)
            assert key_cost == pytest.approx(records["key_cost_micro_usd"] / 1e6, abs=1e-9)
            assert delta["sum(flux_proxy_failovers_total)"] == len(records["failovers"]) == 1
            assert delta["sum(flux_proxy_retries_total)"] == records["retries"] == 1
            failovers_after = prom.by("sum by (from, to) (flux_proxy_failovers_total)",
                                      "from", "to", at=at)
            moved = {k: v - failovers_before.get(k, 0) for k, v in failovers_after.items()}
            assert {k: v for k, v in moved.items() if v} == {
                pair: float(records["failovers"].count(pair)) for pair in records["failovers"]}
            assert delta["sum(flux_proxy_images_total)"] == records["images"]
            assert delta["sum(flux_proxy_nsfw_images_total)"] == records["nsfw"] >= 1
            completed = delta['sum(flux_proxy_predictions_total{status="completed"})']
            finished = delta["sum(flux_proxy_predictions_total)"]
            assert (completed, finished) == (records["completed"], records["finished"])

            # The dashboards' own range figures, within increase()'s extrapolation: it
            # scales a series' increase by (sampled span + up to half a scrape interval
            # before + up to 1.1 intervals after) / sampled span, the same end for all.
            span = done - baseline  # the samples span at least this
            stats = {title: expr for dash, title, expr in panel_queries()
                     if dash == "flux-proxy"}
            cost = prom.value(substitute(stats["Cost (range)"], range_s), at)
            spend_usd = records["cost_micro_usd"] / 1e6
            assert spend_usd * (1 - 1e-9) <= cost <= spend_usd * (1 + 2 * SCRAPE_S / span)
            ratio = prom.value(substitute(stats["Success ratio (range)"], range_s), at)
            assert ratio == pytest.approx(records["completed"] / records["finished"],
                                          rel=SCRAPE_S / span)


def drive(base: str, wavespeed: SimulatorServer, vibedream: SimulatorServer,
          worker_url: str) -> dict[str, Any]:
    """Real predictions through the simulators and the worker; what the proxy recorded."""
    suffix = uuid.uuid4().hex[:6]
    with httpx.Client(base_url=base, timeout=30) as admin:
        admin.headers["Authorization"] = f"Bearer {ADMIN}"
        key_name = f"live-{suffix}"
        key = admin.post("/admin/keys", json={"name": key_name, "budget_usd": "5"})
        tight = admin.post("/admin/keys", json={"name": f"tight-{suffix}",
                                                "budget_usd": "0.001"})
        assert key.status_code == tight.status_code == 201, (key.text, tight.text)

        ids: list[str] = []
        with httpx.Client(base_url=base, timeout=30, headers={
                "Authorization": f"Bearer {key.json()['key']}"}) as c:

            def predict(prompt: str = "a lighthouse", **extra: Any) -> dict[str, Any]:
                r = c.post("/v1/predictions", json={
                    "prompt": prompt, "size": "512*512", "enable_sync_mode": True, **extra})
                assert r.status_code in (200, 201, 202), r.text
                body: dict[str, Any] = r.json()
                ids.append(body["id"])
                assert body["status"] in ("completed", "failed"), body
                return body

            assert predict()["provider"] == "wavespeed"
            # The key's cost series is created by its first increment, which rate() cannot
            # see: let a scrape pass before the key spends again, so its rate is not 0.
            time.sleep(2 * SCRAPE_S)
            assert predict("a lighthouse [sim:nsfw]")["has_nsfw_contents"] == [True]
            local = predict(providers=["local"], num_inference_steps=4)
            assert local["provider"] == "local", local
            wavespeed.config.job_latency_s = 1.0  # slow primary: hedged on VibeDream
            hedged = predict()
            wavespeed.config.job_latency_s = 0.05
            assert [a["provider"] for a in hedged["attempts"]] == ["wavespeed", "vibedream"]
            assert hedged["provider"] == "vibedream", hedged
            moderated = predict("a lighthouse [sim:moderate]", providers=["vibedream"])
            assert moderated["error_kind"] == "policy_refusal", moderated
            wavespeed.config.error_rate = 1.0  # a failover to VibeDream
            failover = predict()
            wavespeed.config.error_rate = 0.0
            assert [a["provider"] for a in failover["attempts"]] == ["wavespeed", "vibedream"]
            retried = predict("a lighthouse [sim:429]", providers=["vibedream"])
            assert [a["error_kind"] for a in retried["attempts"]] == ["rate_limited"] * 2
            assert c.get("/v1/predictions/no-such-id").status_code == 404

        # A refusal: the tight key's budget cannot cover one image.
        refused = httpx.post(f"{base}/v1/predictions", timeout=10, json={
            "prompt": "a lighthouse", "size": "512*512"},
            headers={"Authorization": f"Bearer {tight.json()['key']}"})
        assert refused.status_code == 402, refused.text
        fill_the_worker_queue(worker_url)

        preds = [admin.get(f"/v1/predictions/{i}").json() for i in ids]
        spend = admin.get("/v1/spend").json()["total"]
        by_key = {row["group"]: row for row in
                  admin.get("/v1/spend", params={"group_by": "key"}).json()["data"]}
    failovers: list[tuple[str, str]] = []
    retries = 0
    for pred in preds:
        pairs, n = failovers_and_retries(pred["attempts"])
        failovers += pairs
        retries += n
    completed = [p for p in preds if p["status"] == "completed"]
    return {
        "key_name": key_name,
        "cost_micro_usd": spend["cost_micro_usd"],
        "key_cost_micro_usd": by_key[key_name]["cost_micro_usd"],
        "failovers": failovers,
        "retries": retries,
        "images": sum(len(p["outputs"]) for p in completed),
        "nsfw": sum(sum(p["has_nsfw_contents"]) for p in completed),
        "completed": len(completed),
        "finished": len(preds),
    }
