"""Failover hygiene: an open breaker is skipped at once, nothing available fails
fast with the reason and when to retry, a retry on the same provider is not a
failover, and our own configuration is never the provider's fault."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from providers.base import ConfigurationError, ErrorKind
from providers.testing import Accept, Complete, Raise, ScriptedProvider
from proxy.lifecycle.service import Unavailable

from .conftest import Harness, finished, request

pytestmark = pytest.mark.looptime
TRIP = {"breaker": {"failure_threshold": 1, "cooldown_s": 30}}


def failovers(src: str, dst: str) -> float:
    labels = {"from_provider": src, "to_provider": dst, "reason": "rate_limited"}
    return REGISTRY.get_sample_value("flux_proxy_failovers_total", labels) or 0.0


async def test_an_open_breaker_is_skipped_at_once(harness: Harness) -> None:
    a = ScriptedProvider("a", [Raise(ErrorKind.UNAVAILABLE)])
    b = ScriptedProvider("b", [Accept(), Accept()])
    service = harness.service(a, b, **TRIP)
    await finished(service, await service.submit(request()))  # a fails: its breaker opens
    run = await finished(service, await service.submit(request()))
    assert run.pred.provider == "b" and a.submits == 1
    waited = (run.pred.completed_at - run.pred.created_at).total_seconds()  # type: ignore[operator]
    assert waited < 2  # one poll interval, no wait for a's cooldown


async def test_nothing_available_is_refused_before_accepting_with_retry_after(
        harness: Harness) -> None:
    a = ScriptedProvider("a", [Raise(ErrorKind.UNAVAILABLE)])
    service = harness.service(a, **TRIP)
    await finished(service, await service.submit(request()))
    with pytest.raises(Unavailable, match="breaker open") as caught:
        await service.submit(request())
    assert 29 < caught.value.retry_after_s <= 30
    rows, _ = await harness.store.list_predictions()
    assert len(rows) == 1  # the refused request wrote nothing


async def test_a_running_prediction_does_not_wait_out_a_long_cooldown(harness: Harness) -> None:
    a = ScriptedProvider("a", [Raise(ErrorKind.RATE_LIMITED, retry_after=120)])
    service = harness.service(a)
    run = await finished(service, await service.submit(request()))
    assert run.pred.status == "failed" and run.pred.error_kind == "unavailable"
    assert "rate-limited" in (run.pred.error or "")
    took = (run.pred.completed_at - run.pred.created_at).total_seconds()  # type: ignore[operator]
    assert took < 5


async def test_a_retry_on_the_same_provider_is_not_a_failover(harness: Harness) -> None:
    a = ScriptedProvider("a", [Raise(ErrorKind.RATE_LIMITED, retry_after=1), Accept()])
    service = harness.service(a)
    before = failovers("a", "a")
    run = await finished(service, await service.submit(request()))
    assert run.pred.status == "completed" and a.submits == 2
    assert failovers("a", "a") == before


class MisconfiguredAssets(ScriptedProvider):
    async def download(self, url: str) -> tuple[bytes, str | None]:
        raise ConfigurationError(f"{self.name}: output host is not in "
                                 f"providers.{self.name}.asset_hosts: add it there",
                                 provider=self.name)


async def test_our_configuration_error_names_the_setting_and_spares_the_breaker(
        harness: Harness) -> None:
    a = MisconfiguredAssets("a", [Accept()] * 3)
    inline = Complete(outputs=["data:image/png;base64,iVBORw0KGgo="])
    b = ScriptedProvider("b", [Accept(then=inline)])
    service = harness.service(a, b, **TRIP)
    run = await finished(service, await service.submit(request(enable_base64_output=True)))
    _, attempts = await harness.rows(run.pred.id)
    assert attempts[0].error_kind == "configuration_error"
    assert "providers.a.asset_hosts" in (attempts[0].error or "")
    assert service.router.snapshot()["a"]["state"] == "closed"  # not the provider's fault
    assert run.pred.status == "completed" and run.pred.provider == "b"
