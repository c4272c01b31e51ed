"""Webhooks: a request's `webhook` gets the prediction POSTed on its events, signed per
Standard Webhooks (checked with the `standardwebhooks` library's own verifier in a
loopback receiver), at least once, from the database: retried with backoff, across a
restart, visible and redeliverable through /admin/webhooks; URLs pass the outbound
guard; secrets are per key, shown once, rotatable with a grace period."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from providers.simulators import SimulatorServer
from proxy.store import Store

from ._serve import pg_database
from ._webhooks import Receiver, receiving
from .conftest import make_settings, running_proxy, wait_terminal

ADMIN = "hooks-admin-key"
BODY = {"prompt": "a lighthouse", "size": "512*512"}
FAST = {"webhook_backoff_s": 0.1, "webhook_backoff_max_s": 0.2, "webhook_allow_private": True}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as hook:
        yield hook


def keyed(tmp_path: Path, sim: SimulatorServer, **overrides: Any) -> Any:
    return make_settings(tmp_path, {"wavespeed": sim}, auth_enabled=True, admin_key=ADMIN,
                         **(FAST | overrides))


async def new_key(c: Any, name: str = "hooks-app") -> tuple[dict[str, str], str]:
    made = await c.post("/admin/keys", json={"name": name}, headers=bearer(ADMIN))
    assert made.status_code == 201, made.text
    secret = made.json()["webhook_secret"]
    assert secret.startswith("whsec_")
    return bearer(made.json()["key"]), secret


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def verified(secret: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(body, headers)
    return payload


async def deliveries(c: Any, pred_id: str) -> list[dict[str, Any]]:
    r = await c.get("/admin/webhooks", params={"prediction_id": pred_id}, headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    return list(reversed(r.json()["data"]))  # oldest first


async def settled(c: Any, pred_id: str) -> dict[str, Any]:
    """The prediction's one delivery once its last POST is recorded (it is recorded
    just after the receiver answers)."""
    for _ in range(200):
        [row] = await deliveries(c, pred_id)
        if row["status"] != "waiting":
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"delivery still waiting: {row}")


# --------------------------------------------------------------------------- delivery


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'hooks.db'}"
        return
    with pg_database() as url:
        yield url


async def test_every_event_is_posted_signed_in_order(
    database: str, tmp_path: Path, wavespeed_sim: SimulatorServer, receiver: Receiver
) -> None:
    settings = keyed(tmp_path, wavespeed_sim, database_url=database)
    async with running_proxy(settings) as c:
        auth, secret = await new_key(c)
        r = await c.post("/v1/predictions", headers=auth, json={
            **BODY, "webhook": receiver.url,
            "webhook_events_filter": ["completed", "start", "output"]})
        assert r.status_code == 202, r.text
        pred_id = r.json()["id"]
        final = await wait_terminal(c, pred_id, headers=auth)
        await receiver.wait(lambda h: len(h.accepted()) == 3)
        for _ in range(200):  # each POST is recorded just after its answer
            rows = await deliveries(c, pred_id)
            if all(d["status"] != "waiting" for d in rows):
                break
            await asyncio.sleep(0.05)

    events = [h["x-flux-webhook-event"] for h, _ in receiver.accepted()]
    assert events == ["start", "output", "completed"]
    payloads = [verified(secret, h, b) for h, b in receiver.accepted()]
    assert {p["id"] for p in payloads} == {pred_id}
    assert payloads[0]["status"] in ("processing", "completed")
    assert payloads[-1]["status"] == "completed"
    assert payloads[-1]["outputs"] == final["outputs"] and final["outputs"]
    assert payloads[-1]["cost_usd"] == final["cost_usd"]
    assert payloads[-1]["urls"]["get"] == f"http://proxy.test/v1/predictions/{pred_id}"
    # webhook-id is the delivery's id: one per event, listed by the admin route.
    ids = {h["webhook-id"]: h["x-flux-webhook-event"] for h, _ in receiver.accepted()}
    assert ids == {d["id"]: d["event"] for d in rows} and len(ids) == 3
    assert all(d["status"] == "delivered" and d["attempts"] == 1 for d in rows)
    assert all(d["history"][0]["status_code"] == 200 for d in rows)
    # The signature is over the exact body: one byte changed and it fails.
    headers, body = receiver.accepted()[-1]
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"completed", b"Completed", 1), headers)


async def test_a_receiver_that_fails_twice_gets_it_after_a_restart(
    tmp_path: Path, wavespeed_sim: SimulatorServer, receiver: Receiver
) -> None:
    """Two 500s, the proxy restarted between the retries, then a 200: the same
    webhook-id each time, every POST recorded, delivered once accepted."""
    receiver.codes = [500, 500]
    settings = keyed(tmp_path, wavespeed_sim, webhook_backoff_s=0.3, webhook_backoff_max_s=0.3)
    async with running_proxy(settings) as c:
        auth, secret = await new_key(c)
        r = await c.post("/v1/predictions", headers=auth,
                         json={**BODY, "webhook": receiver.url})
        pred_id = r.json()["id"]
        await wait_terminal(c, pred_id, headers=auth)
        await receiver.wait(lambda h: len(h.received) >= 1)
    first_run = len(receiver.received)
    assert first_run < 3  # stopped before the delivery was accepted
    async with running_proxy(settings) as c:  # the same database: a restart
        await receiver.wait(lambda h: len(h.accepted()) == 1)
        row = await settled(c, pred_id)
    codes = [code for _, _, code in receiver.received]
    assert codes == [500, 500, 200]
    assert len({h["webhook-id"] for h, _, _ in receiver.received}) == 1
    for headers, body, _ in receiver.received:
        assert verified(secret, headers, body)["status"] == "completed"
    assert row["status"] == "delivered" and row["attempts"] == 3
    assert [a["status_code"] for a in row["history"]] == [500, 500, 200]
    assert row["last_error"] is None


async def test_gives_up_after_the_retry_window_and_an_admin_redelivers(
    tmp_path: Path, wavespeed_sim: SimulatorServer, receiver: Receiver
) -> None:
    receiver.codes = [503] * 50
    settings = keyed(tmp_path, wavespeed_sim, webhook_retry_window_s=0.5)
    async with running_proxy(settings) as c:
        auth, secret = await new_key(c)
        pred_id = (await c.post("/v1/predictions", headers=auth,
                                json={**BODY, "webhook": receiver.url})).json()["id"]
        await wait_terminal(c, pred_id, headers=auth)
        for _ in range(100):
            [row] = await deliveries(c, pred_id)
            if row["status"] == "failed":
                break
            await asyncio.sleep(0.05)
        assert row["status"] == "failed", row
        assert row["attempts"] >= 2 and row["last_status_code"] == 503
        assert "HTTP 503" in row["last_error"]
        tries = len(receiver.received)
        receiver.codes.clear()  # the receiver is fixed
        again = await c.post(f"/admin/webhooks/{row['id']}/redeliver", headers=bearer(ADMIN))
        assert again.status_code == 202, again.text
        await receiver.wait(lambda h: len(h.accepted()) == 1)
        row = await settled(c, pred_id)
        assert row["status"] == "delivered" and row["attempts"] == tries + 1
        assert (await c.post("/admin/webhooks/nope/redeliver",
                             headers=bearer(ADMIN))).status_code == 404
        assert (await c.get("/admin/webhooks", headers=auth)).status_code in (401, 403)
    headers, body = receiver.accepted()[0]
    assert headers["webhook-id"] == row["id"]
    assert verified(secret, headers, body)["id"] == pred_id


async def test_output_event_is_skipped_when_the_prediction_fails(
    tmp_path: Path, wavespeed_sim: SimulatorServer, receiver: Receiver
) -> None:
    async with running_proxy(keyed(tmp_path, wavespeed_sim)) as c:
        auth, secret = await new_key(c)
        r = await c.post("/v1/predictions", headers=auth, json={
            **BODY, "prompt": "a lighthouse [sim:fail_after_accept]", "webhook": receiver.url,
            "webhook_events_filter": ["output", "completed"]})
        pred_id = r.json()["id"]
        assert (await wait_terminal(c, pred_id, headers=auth))["status"] == "failed"
        await receiver.wait(lambda h: len(h.accepted()) == 1)
        for _ in range(100):
            rows = {d["event"]: d["status"] for d in await deliveries(c, pred_id)}
            if "waiting" not in rows.values():
                break
            await asyncio.sleep(0.05)
    assert rows == {"output": "skipped", "completed": "delivered"}
    [(headers, body)] = receiver.accepted()
    assert verified(secret, headers, body)["status"] == "failed"


# --------------------------------------------------------------------------- admission


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1:9/hook", "loopback"),
    ("http://localhost:9/hook", "loopback"),
    ("http://169.254.169.254/latest", "metadata"),
    ("http://10.1.2.3/hook", "private"),
])
async def test_internal_webhook_urls_are_refused_and_nothing_is_written(
    url: str, reason: str, tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    """The outbound guard decides before anything is written; no connection is made
    (the address is refused as resolved)."""
    settings = keyed(tmp_path, wavespeed_sim, webhook_allow_private=False)
    async with running_proxy(settings) as c:
        auth, _ = await new_key(c)
        r = await c.post("/v1/predictions", headers=auth, json={**BODY, "webhook": url})
        assert r.status_code == 422, r.text
        [detail] = r.json()["error"]["details"]
        assert detail["field"] == "webhook" and reason in detail["reason"]
        listed = await c.get("/v1/predictions", headers=auth)
        assert listed.json()["data"] == []
    assert wavespeed_sim.stats["submits"] == 0


@pytest.mark.parametrize("body, field_name", [
    ({"webhook": "ftp://example.com/x"}, "webhook"),
    ({"webhook": "https://user:pw@example.com/x"}, "webhook"),
    ({"webhook": "https://example.com/x", "webhook_events_filter": ["finished"]},
     "webhook_events_filter.0"),
    ({"webhook": "https://example.com/x", "webhook_events_filter": []},
     "webhook_events_filter"),
    ({"webhook": "https://example.com/x", "webhook_events_filter": ["start", "start"]},
     "webhook_events_filter"),
])
async def test_malformed_webhook_fields_are_named(
    body: dict[str, Any], field_name: str, tmp_path: Path, wavespeed_sim: SimulatorServer
) -> None:
    async with running_proxy(make_settings(tmp_path, {"wavespeed": wavespeed_sim})) as c:
        r = await c.post("/v1/predictions", json={**BODY, **body})
        assert r.status_code == 422, r.text
        assert [d["field"] for d in r.json()["error"]["details"]] == [field_name]


async def test_keyless_predictions_need_a_configured_secret(
    tmp_path: Path, wavespeed_sim: SimulatorServer, receiver: Receiver
) -> None:
    plain = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, **FAST)
    async with running_proxy(plain) as c:
        r = await c.post("/v1/predictions", json={**BODY, "webhook": receiver.url})
        assert r.status_code == 422
        assert r.json()["error"]["details"][0]["field"] == "webhook"
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    signed = make_settings(tmp_path, {"wavespeed": wavespeed_sim}, webhook_secret=secret, **FAST)
    async with running_proxy(signed) as c:
        r = await c.post("/v1/predictions", json={**BODY, "webhook": receiver.url})
        assert r.status_code == 202, r.text
        await receiver.wait(lambda h: len(h.accepted()) == 1)
    [(headers, body)] = receiver.accepted()
    assert verified(secret, headers, body)["id"] == r.json()["id"]


# --------------------------------------------------------------------------- secrets


async def test_rotation_signs_with_both_secrets_during_the_grace_period(
    tmp_path: Path, wavespeed_sim: SimulatorServer, receiver: Receiver
) -> None:
    settings = keyed(tmp_path, wavespeed_sim)
    async with running_proxy(settings) as c:
        auth, old = await new_key(c)
        rotated = await c.post("/admin/keys/hooks-app/webhook-secret", headers=bearer(ADMIN))
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["webhook_secret"]
        assert new != old and rotated.json()["webhook_previous_secret_until"]
        listed = (await c.get("/admin/keys", headers=bearer(ADMIN))).text
        assert old not in listed and new not in listed  # shown once only
        r = await c.post("/v1/predictions", headers=auth, json={**BODY, "webhook": receiver.url})
        await receiver.wait(lambda h: len(h.accepted()) == 1)
        assert (await c.post("/admin/keys/nobody/webhook-secret",
                             headers=bearer(ADMIN))).status_code == 404
    [(headers, body)] = receiver.accepted()
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verified(old, headers, body)["id"] == r.json()["id"]
    assert verified(new, headers, body)["id"] == r.json()["id"]
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(body, headers)


async def test_without_grace_only_the_new_secret_signs(
    tmp_path: Path, wavespeed_sim: SimulatorServer, receiver: Receiver
) -> None:
    settings = keyed(tmp_path, wavespeed_sim, webhook_secret_grace_s=0)
    async with running_proxy(settings) as c:
        auth, old = await new_key(c)
        new = (await c.post("/admin/keys/hooks-app/webhook-secret",
                            headers=bearer(ADMIN))).json()["webhook_secret"]
        await c.post("/v1/predictions", headers=auth, json={**BODY, "webhook": receiver.url})
        await receiver.wait(lambda h: len(h.accepted()) == 1)
    [(headers, body)] = receiver.accepted()
    assert verified(new, headers, body)
    with pytest.raises(WebhookVerificationError):
        verified(old, headers, body)


async def test_a_key_without_a_secret_is_told_how_to_get_one(
    tmp_path: Path, wavespeed_sim: SimulatorServer, receiver: Receiver
) -> None:
    """Keys made before webhooks existed have no secret: refused until one is rotated in."""
    settings = keyed(tmp_path, wavespeed_sim)
    async with running_proxy(settings) as c:
        auth, _ = await new_key(c)
        async with Store(settings.database_url) as store:
            row = await store.find_key("hooks-app")
            assert row is not None
            await store.set_webhook_secret(row.id, None, None, None)  # before its first use
        r = await c.post("/v1/predictions", headers=auth, json={**BODY, "webhook": receiver.url})
        assert r.status_code == 422, r.text
        assert "flux-proxy keys webhook-secret" in r.json()["error"]["details"][0]["reason"]
        made = await c.post("/admin/keys/hooks-app/webhook-secret", headers=bearer(ADMIN))
        r = await c.post("/v1/predictions", headers=auth, json={**BODY, "webhook": receiver.url})
        assert r.status_code == 202, r.text
        await receiver.wait(lambda h: len(h.accepted()) == 1)
    [(headers, body)] = receiver.accepted()
    assert verified(made.json()["webhook_secret"], headers, body)["id"] == r.json()["id"]


def test_payload_is_the_prediction_as_get_shows_it(tmp_path: Path) -> None:
    """The body is the same JSON as GET /v1/predictions/{id} (the unified view)."""
    from proxy.api.render import prediction_view, webhook_body
    from proxy.store.models import Prediction

    pred = Prediction(model="flux-dev", request={"prompt": "x"}, seed=7, status="completed",
                      outputs=["https://cdn.example/1.jpg"], has_nsfw_contents=[False])
    body = json.loads(webhook_body(pred, [], "https://flux.internal"))
    assert body["id"] == pred.id and body["outputs"] == ["https://cdn.example/1.jpg"]
    assert body["urls"]["get"] == f"https://flux.internal/v1/predictions/{pred.id}"
    assert set(body) == set(prediction_view(pred, [], "x").__struct_fields__)


async def test_finished_deliveries_are_forgotten_after_the_history_window(
    tmp_path: Path, wavespeed_sim: SimulatorServer, receiver: Receiver
) -> None:
    """The two webhook tables stay bounded: finished deliveries and their POSTs go
    after webhook_history_s; one still waiting stays."""
    from datetime import timedelta

    from proxy.store.models import utcnow

    settings = keyed(tmp_path, wavespeed_sim, webhook_backoff_s=30)
    async with running_proxy(settings) as c:
        auth, _ = await new_key(c)
        done = (await c.post("/v1/predictions", headers=auth,
                             json={**BODY, "webhook": receiver.url})).json()["id"]
        await receiver.wait(lambda h: len(h.accepted()) == 1)
        await settled(c, done)
        receiver.codes = [500] * 200  # this one's delivery keeps waiting (30 s backoff)
        waiting = (await c.post("/v1/predictions", headers=auth,
                                json={**BODY, "webhook": receiver.url})).json()["id"]
        await receiver.wait(lambda h: len(h.received) == 2)
    async with Store(settings.database_url) as store:
        assert await store.sweep_webhooks(utcnow() - timedelta(hours=1)) == 0  # too recent
        assert await store.sweep_webhooks(utcnow() + timedelta(seconds=1)) == 1
        assert await store.list_webhooks(prediction_id=done) == []
        [kept] = await store.list_webhooks(prediction_id=waiting)
        assert kept.status == "waiting"
        assert (await store.webhook_attempts([kept.id]))[kept.id]
