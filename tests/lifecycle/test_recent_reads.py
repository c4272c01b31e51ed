"""A client's GET of a prediction that just ended here needs no query; a later one
(or one on another replica) reads the database."""

from __future__ import annotations

from typing import Any

import pytest

from providers.testing import Accept, ScriptedProvider
from proxy.lifecycle import service as service_module

from .conftest import Harness, finished, request

pytestmark = pytest.mark.looptime


async def test_a_just_ended_prediction_is_answered_from_memory(harness: Harness,
                                                               monkeypatch: Any) -> None:
    service = harness.service(ScriptedProvider("a", [Accept(polls=1)]))
    run = await finished(service, await service.submit(request()))
    reads = 0
    real = harness.store.get_with_attempts

    async def counted(prediction_id: str) -> Any:
        nonlocal reads
        reads += 1
        return await real(prediction_id)

    monkeypatch.setattr(harness.store, "get_with_attempts", counted)
    pred, attempts = await service.get(run.pred.id)
    assert reads == 0 and pred.status == "completed" and attempts[0].status == "completed"
    stored, _ = await real(run.pred.id)  # type: ignore[misc]
    assert (pred.status, pred.cost_micro_usd, pred.outputs) == (
        stored.status, stored.cost_micro_usd, stored.outputs)
    harness.clock.advance(service_module.RECENT_TTL_S + 1)
    await service.get(run.pred.id)
    assert reads == 1  # expired: read from the database again
