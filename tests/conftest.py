"""Shared fixtures: simulators on loopback, and a proxy app wired to them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from litestar.testing import AsyncTestClient

from providers.simulators import SimConfig, SimulatorServer
from proxy.app import create_app
from proxy.config import TEST_RUN_VARIABLES, Settings
from proxy.store import Store

# TEST_RUN_VARIABLES steer the test run itself, not the proxy under test (the
# proxy allows them too; they are defined once, in proxy/config.py).


def isolate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provider key or proxy config of the machine leaks into a test (module
    fixtures call it with a MonkeyPatch of their own)."""
    for name in list(os.environ):
        if name in TEST_RUN_VARIABLES:
            continue
        if name.startswith(("FLUX_PROXY_", "VIBEDREAM_", "WAVESPEED_", "LOCAL_WORKER")):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach a real upstream: no provider key or config leaks in."""
    isolate_env(monkeypatch)


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value from a /metrics page (0.0 when it is not there yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.fixture
def vibedream_sim() -> Iterator[SimulatorServer]:
    with SimulatorServer("vibedream", SimConfig(job_latency_s=0.05)) as sim:
        yield sim


@pytest.fixture
def wavespeed_sim() -> Iterator[SimulatorServer]:
    with SimulatorServer("wavespeed", SimConfig(job_latency_s=0.05)) as sim:
        yield sim


def provider_table(sim: SimulatorServer, **extra: Any) -> dict[str, Any]:
    host = urlsplit(sim.base_url).netloc
    return {
        "base_url": sim.base_url,
        "api_key": "sim-key",
        "asset_hosts": [host],
        "allow_private_asset_hosts": True,
        "poll_initial_s": 0.02,
        "poll_max_s": 0.1,
        "read_timeout_s": 5.0,
        **extra,
    }


def make_settings(
    tmp_path: Path, sims: dict[str, SimulatorServer], **overrides: Any
) -> Settings:
    provider_overrides = overrides.pop("provider_extra", {})
    providers = {
        name: provider_table(sim, **provider_overrides.get(name, {})) for name, sim in sims.items()
    }
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'proxy.db'}",
        "providers": providers,
        "routing": {"order": list(sims)},
        "public_base_url": "http://proxy.test",
        "instance_id": "test-instance",
        "auth_enabled": False,  # tests/test_auth.py covers keys
    }
    return Settings(**(values | overrides))


@asynccontextmanager
async def running_proxy(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(settings)
    async with AsyncTestClient(app, base_url="http://proxy.test") as client:
        yield client


async def wait_for(
    client: AsyncTestClient[Any],
    pred_id: str,
    cond: Callable[[dict[str, Any]], Any],
    timeout_s: float = 10.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Poll our own API until `cond(prediction)` holds (bounded in count and time)."""
    import anyio

    body: dict[str, Any] = {}
    with anyio.fail_after(timeout_s):
        for _ in range(int(timeout_s / 0.02) + 1):
            r = await client.get(f"/v1/predictions/{pred_id}", headers=headers)
            assert r.status_code == 200, r.text
            body = r.json()
            if cond(body):
                return body
            await anyio.sleep(0.02)
    raise AssertionError(f"condition not met; last state: {body}")


async def wait_terminal(
    client: AsyncTestClient[Any], pred_id: str, timeout_s: float = 10.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    return await wait_for(
        client, pred_id, lambda b: b["status"] in ("completed", "failed", "canceled"),
        timeout_s, headers,
    )


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file; every test gets a copy (migrating per test is slow)."""
    path = tmp_path_factory.mktemp("template") / "template.db"

    async def migrate() -> None:
        store = Store(f"sqlite+aiosqlite:///{path}")
        await store.upgrade()
        await store.dispose()

    asyncio.run(migrate())
    return path
