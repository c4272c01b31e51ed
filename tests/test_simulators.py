"""The simulators over real loopback HTTP: wire shapes, images, and every fault knob."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from providers.simulators import SimConfig, SimulatorServer

VD_SUBMIT = "/api/v1/models/flux-dev/generate"
WS_SUBMIT = "/api/v3/wavespeed-ai/flux-dev"
SUBMIT = {"vibedream": VD_SUBMIT, "wavespeed": WS_SUBMIT}
AUTH = {"Authorization": "Bearer sim-key"}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MODERATION = "Your request was flagged by content moderation. Please modify your prompt."


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, SimulatorServer]]:
    with SimulatorServer("vibedream") as vd, SimulatorServer("wavespeed") as ws:
        yield {"vibedream": vd, "wavespeed": ws}


@pytest.fixture
def vd(servers: dict[str, SimulatorServer]) -> Iterator[httpx.Client]:
    yield from _client(servers["vibedream"])


@pytest.fixture
def ws(servers: dict[str, SimulatorServer]) -> Iterator[httpx.Client]:
    yield from _client(servers["wavespeed"])


def _client(sim: SimulatorServer) -> Iterator[httpx.Client]:
    sim.reset()
    with httpx.Client(base_url=sim.base_url, headers=AUTH, timeout=5.0) as client:
        yield client
    sim.reset()


def _terminal(client: httpx.Client, url: str, kind: str) -> dict[str, Any]:
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        body = client.get(url).json()
        data = body["data"] if kind == "wavespeed" else body
        if data["status"] not in ("created", "processing"):
            return data
        time.sleep(0.02)
    raise AssertionError("job never reached a terminal state")


def _image(client: httpx.Client, url: str) -> Image.Image:
    response = client.get(url)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    assert response.headers["content-type"] == Image.MIME[str(image.format)]
    return image


# --------------------------------------------------------------------------- VibeDream


def test_vibedream_submit_poll_complete(vd: httpx.Client) -> None:
    r = vd.post(VD_SUBMIT, json={"prompt": "a cat [sim:latency=0.2]", "num_images": 2})
    assert r.status_code == 200
    sub = r.json()
    assert set(sub) == {"id", "status", "statusUrl", "estimatedTime", "costCents", "createdAt"}
    assert sub["status"] == "processing"
    assert sub["statusUrl"] == f"{vd.base_url}/api/v1/predictions/{sub['id']}"
    assert sub["costCents"] == 4
    assert ISO.match(sub["createdAt"])

    running = vd.get(sub["statusUrl"]).json()
    assert running == {
        "id": sub["id"],
        "modelId": "flux-dev",
        "modelName": "FLUX.1 Dev",
        "status": "processing",
        "outputs": None,
        "error": None,
        "createdAt": sub["createdAt"],
        "completedAt": None,
    }
    done = _terminal(vd, sub["statusUrl"], "vibedream")
    assert done["status"] == "completed" and done["error"] is None
    assert ISO.match(done["completedAt"]) and len(done["outputs"]) == 2
    assert all(u.startswith(f"{vd.base_url}/assets/{sub['id']}/") for u in done["outputs"])


@pytest.mark.parametrize(
    ("size", "fmt"), [("512*512", "jpeg"), ("768*1024", "png"), ("1280*720", "webp")]
)
def test_vibedream_images_have_size_and_format(vd: httpx.Client, size: str, fmt: str) -> None:
    body = {"prompt": "p", "size": size, "output_format": fmt, "seed": 7}
    sub = vd.post(VD_SUBMIT, json=body).json()
    done = _terminal(vd, sub["statusUrl"], "vibedream")
    image = _image(vd, done["outputs"][0])
    assert f"{image.width}*{image.height}" == size
    assert image.format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]


VD_BAD = [
    {}, {"prompt": ""}, {"prompt": "p", "size": "1000*1000"}, {"prompt": "p", "strength": 1.5},
    {"prompt": "p", "num_inference_steps": 51}, {"prompt": "p", "num_inference_steps": 2.5},
    {"prompt": "p", "guidance_scale": 0.5}, {"prompt": "p", "num_images": 5},
    {"prompt": "p", "seed": -2}, {"prompt": "p", "output_format": "gif"},
    {"prompt": "p", "image": "data:image/png;base64,AAAA"}, {"prompt": "p [sim:no-such-thing]"},
]  # fmt: skip


@pytest.mark.parametrize("bad", VD_BAD)
def test_vibedream_rejects_invalid_input(vd: httpx.Client, bad: dict[str, Any]) -> None:
    r = vd.post(VD_SUBMIT, json=bad)
    assert r.status_code == 400
    assert set(r.json()) == {"error"} and r.json()["error"]


def test_vibedream_ignores_unknown_fields(vd: httpx.Client) -> None:
    body = {"prompt": "p", "enable_sync_mode": True, "enable_base64_output": True, "x": 1}
    assert vd.post(VD_SUBMIT, json=body).json()["status"] == "processing"


def test_vibedream_moderation(vd: httpx.Client) -> None:
    sub = vd.post(VD_SUBMIT, json={"prompt": "bad [sim:moderate]"}).json()
    done = _terminal(vd, sub["statusUrl"], "vibedream")
    assert done["status"] == "failed" and done["outputs"] is None
    assert done["error"] == MODERATION and ISO.match(done["completedAt"])


def test_vibedream_fail_after_accept_is_not_moderation(vd: httpx.Client) -> None:
    sub = vd.post(VD_SUBMIT, json={"prompt": "[sim:fail-after-accept]"}).json()
    done = _terminal(vd, sub["statusUrl"], "vibedream")
    assert done["status"] == "failed" and done["error"] and done["error"] != MODERATION


def test_vibedream_auth(vd: httpx.Client) -> None:
    url = f"{vd.base_url}{VD_SUBMIT}"
    missing = httpx.post(url, json={"prompt": "p"})
    wrong = httpx.post(url, json={"prompt": "p"}, headers={"Authorization": "Bearer nope"})
    for r in (missing, wrong):
        assert r.status_code == 401 and set(r.json()) == {"error"}
    sub = vd.post(VD_SUBMIT, json={"prompt": "p"}).json()
    assert httpx.get(sub["statusUrl"]).status_code == 401
    assert vd.get("/api/v1/predictions/nope").status_code == 404


# --------------------------------------------------------------------------- WaveSpeed


def test_wavespeed_submit_poll_complete(ws: httpx.Client) -> None:
    r = ws.post(WS_SUBMIT, json={"prompt": "a cat [sim:latency=0.3]", "size": "300*1536"})
    assert r.status_code == 200
    sub = r.json()
    assert (sub["code"], sub["message"]) == (200, "success")
    data = sub["data"]
    poll = f"{ws.base_url}/api/v3/predictions/{data['id']}/result"
    assert data == {
        "id": data["id"],
        "model": "wavespeed-ai/flux-dev",
        "outputs": [],
        "urls": {"get": poll},
        "has_nsfw_contents": [],
        "status": "created",
        "created_at": data["created_at"],
        "error": "",
        "timings": {"inference": 0},
    }
    assert ISO.match(data["created_at"])
    time.sleep(0.1)
    assert ws.get(poll).json()["data"]["status"] == "processing"
    done = _terminal(ws, poll, "wavespeed")
    assert done["status"] == "completed" and done["error"] == "" and "code" not in done
    assert done["has_nsfw_contents"] == [False] and done["timings"]["inference"] == 300
    image = _image(ws, done["outputs"][0])
    assert (image.width, image.height, image.format) == (300, 1536, "JPEG")


def test_wavespeed_base64_output_is_plain(ws: httpx.Client) -> None:
    body = {"prompt": "p", "size": "256*320", "output_format": "png", "num_images": 2}
    sub = ws.post(WS_SUBMIT, json=body | {"enable_base64_output": True}).json()
    done = _terminal(ws, sub["data"]["urls"]["get"], "wavespeed")
    assert len(done["outputs"]) == 2 and done["outputs"][0] != done["outputs"][1]
    for out in done["outputs"]:
        assert not out.startswith("data:")
        image = Image.open(io.BytesIO(base64.b64decode(out, validate=True)))
        assert (image.width, image.height, image.format) == (256, 320, "PNG")


def test_wavespeed_nsfw_flags(ws: httpx.Client, servers: dict[str, SimulatorServer]) -> None:
    def flags(body: dict[str, Any]) -> list[bool]:
        sub = ws.post(WS_SUBMIT, json=body).json()
        return list(_terminal(ws, sub["data"]["urls"]["get"], "wavespeed")["has_nsfw_contents"])

    assert flags({"prompt": "[sim:nsfw=1]", "num_images": 3}) == [False, True, False]
    servers["wavespeed"].config.nsfw = True
    assert flags({"prompt": "p", "num_images": 2}) == [True, True]
    assert flags({"prompt": "p", "enable_safety_checker": False}) == [False]


@pytest.mark.parametrize(
    ("prompt", "status", "code"),
    [
        ("[sim:moderate]", "failed", 1200),
        ("[sim:fail-after-accept]", "failed", 5000),
        ("[sim:code=1402]", "failed", 1402),
        ("[sim:status=cancelled]", "cancelled", None),
    ],
)
def test_wavespeed_failed_tasks(ws: httpx.Client, prompt: str, status: str, code: int) -> None:
    sub = ws.post(WS_SUBMIT, json={"prompt": prompt})
    assert sub.status_code == 200
    done = _terminal(ws, sub.json()["data"]["urls"]["get"], "wavespeed")
    assert done["status"] == status and done["error"] and done["outputs"] == []
    assert done.get("code") == code


def test_wavespeed_sync_mode_completes(ws: httpx.Client) -> None:
    body = {"prompt": "p [sim:latency=0.2]", "enable_sync_mode": True, "size": "512*256"}
    started = time.monotonic()
    r = ws.post(WS_SUBMIT, json=body)
    assert time.monotonic() - started >= 0.2
    data = r.json()["data"]
    assert data["status"] == "completed" and len(data["outputs"]) == 1
    assert _image(ws, data["outputs"][0]).size == (512, 256)


def test_wavespeed_sync_give_up(ws: httpx.Client, servers: dict[str, SimulatorServer]) -> None:
    servers["wavespeed"].config.sync_give_up_s = 0.2
    body = {"prompt": "p [sim:latency=0.5]", "enable_sync_mode": True}
    r = ws.post(WS_SUBMIT, json=body)
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["status"] == "processing" and data["code"] == 5004 and data["outputs"] == []
    assert _terminal(ws, data["urls"]["get"], "wavespeed")["status"] == "completed"

    servers["wavespeed"].config.sync_timeout_mode = "504"
    r = ws.post(WS_SUBMIT, json=body)
    assert r.status_code == 504
    with pytest.raises(ValueError):
        r.json()
    assert servers["wavespeed"].stats["jobs"] == 2


WS_BAD = [
    {"size": "255*512"}, {"size": "1537*512"}, {"size": "512x512"}, {"num_images": 0},
    {"seed": 2147483648}, {"guidance_scale": 21}, {"enable_sync_mode": "yes"}, {"prompt": None},
]  # fmt: skip


@pytest.mark.parametrize("bad", WS_BAD)
def test_wavespeed_rejects_invalid_input(ws: httpx.Client, bad: dict[str, Any]) -> None:
    r = ws.post(WS_SUBMIT, json={"prompt": "p"} | bad)
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == 400 and body["message"] and body["data"] is None


def test_wavespeed_auth(ws: httpx.Client) -> None:
    r = httpx.post(f"{ws.base_url}{WS_SUBMIT}", json={"prompt": "p"})
    assert r.status_code == 401
    assert r.json()["code"] == 401 and r.json()["message"]


# --------------------------------------------------------------------------- faults (both)

KINDS = pytest.mark.parametrize("kind", ["vibedream", "wavespeed"])


Post = Callable[..., httpx.Response]


@pytest.fixture(scope="module")
def pool() -> Iterator[httpx.Client]:
    with httpx.Client(headers=AUTH, timeout=5.0) as client:  # one pool: faster than one per call
        yield client


@pytest.fixture
def fresh(servers: dict[str, SimulatorServer]) -> Iterator[dict[str, SimulatorServer]]:
    for sim in servers.values():
        sim.reset()
    yield servers
    for sim in servers.values():
        sim.reset()


@pytest.fixture
def post(fresh: dict[str, SimulatorServer], pool: httpx.Client) -> Post:
    def submit(kind: str, prompt: str, **kw: Any) -> httpx.Response:
        return pool.post(f"{fresh[kind].base_url}{SUBMIT[kind]}", json={"prompt": prompt}, **kw)

    return submit


@KINDS
def test_rate_limit(fresh: dict[str, SimulatorServer], post: Post, kind: str) -> None:
    r = post(kind, "p [sim:429]")
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    fresh[kind].config.rate_limit = 1.0
    fresh[kind].config.retry_after_s = 7
    r = post(kind, "p")
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert fresh[kind].stats["submits"] == 2 and fresh[kind].stats["jobs"] == 0


@KINDS
def test_max_rps(fresh: dict[str, SimulatorServer], post: Post, kind: str) -> None:
    fresh[kind].config.max_rps = 2
    codes = [post(kind, "p").status_code for _ in range(3)]
    assert codes == [200, 200, 429]


@KINDS
def test_server_errors(fresh: dict[str, SimulatorServer], post: Post, kind: str) -> None:
    assert post(kind, "p [sim:502]").status_code == 502
    fresh[kind].config.error_rate = 1.0
    fresh[kind].config.status_5xx = 503
    r = post(kind, "p")
    assert r.status_code == 503 and r.json()


@KINDS
def test_error_rate_is_reproducible(
    fresh: dict[str, SimulatorServer], post: Post, kind: str
) -> None:
    runs = []
    for _ in range(2):
        fresh[kind].reset()
        fresh[kind].config.error_rate = 0.5
        runs.append([post(kind, "p").status_code for _ in range(12)])
    assert runs[0] == runs[1] and {200, 500} == set(runs[0])


@KINDS
def test_malformed(fresh: dict[str, SimulatorServer], post: Post, kind: str) -> None:
    r = post(kind, "p [sim:malformed]")
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    fresh[kind].config.malformed = True
    fresh[kind].config.malformed_body = "shape"
    shaped = post(kind, "p").json()
    assert "id" not in shaped and not isinstance(shaped.get("data"), dict)


@KINDS
def test_drop_is_a_connection_error(
    fresh: dict[str, SimulatorServer], post: Post, kind: str
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        post(kind, "p [sim:drop]")
    fresh[kind].config.drop = True
    with pytest.raises(httpx.RemoteProtocolError):
        post(kind, "p")


@KINDS
def test_hang_times_out(fresh: dict[str, SimulatorServer], post: Post, kind: str) -> None:
    timeout = httpx.Timeout(5.0, read=0.3)
    with pytest.raises(httpx.ReadTimeout):
        post(kind, "p [sim:hang]", timeout=timeout)
    fresh[kind].config.hang = True
    with pytest.raises(httpx.ReadTimeout):
        post(kind, "p", timeout=timeout)


def test_poll_faults(ws: httpx.Client) -> None:
    sub = ws.post(WS_SUBMIT, json={"prompt": "[sim:poll-500=2] [sim:poll-malformed]"}).json()
    url = sub["data"]["urls"]["get"]
    assert [ws.get(url).status_code for _ in range(2)] == [500, 500]
    with pytest.raises(ValueError):
        ws.get(url).json()
    assert ws.get(url).json()["data"]["id"] == sub["data"]["id"]


def test_stats_config_and_reset(ws: httpx.Client, servers: dict[str, SimulatorServer]) -> None:
    sub = ws.post(WS_SUBMIT, json={"prompt": "p"}).json()
    done = _terminal(ws, sub["data"]["urls"]["get"], "wavespeed")
    ws.get(done["outputs"][0])
    assert ws.get("/assets/nope/0.jpg").status_code == 404
    stats = ws.get("/_sim/stats").json()
    assert stats["submits"] == 1 and stats["jobs"] == 1 and stats["asset_gets"] == 2
    assert stats["polls"] >= 1

    r = ws.post("/_sim/config", json={"rate_limit": True, "retry_after_s": 0.5})
    assert r.status_code == 200 and r.json()["rate_limit"] == 1.0
    limited = ws.post(WS_SUBMIT, json={"prompt": "p"})
    assert limited.status_code == 429 and limited.headers["retry-after"] == "0.5"
    assert ws.post("/_sim/config", json={"nope": 1}).status_code == 400
    assert ws.post("/_sim/config", json={"error_rate": "x"}).status_code == 400

    assert ws.post("/_sim/reset").json() == {"ok": True}
    assert ws.get("/_sim/stats").json() == {"submits": 0, "polls": 0, "asset_gets": 0, "jobs": 0}
    assert servers["wavespeed"].config.rate_limit == 0.0
    assert ws.post(WS_SUBMIT, json={"prompt": "p"}).status_code == 200


def test_images_are_deterministic(ws: httpx.Client) -> None:
    body = {"prompt": "p", "seed": 42, "num_images": 2, "enable_base64_output": True}
    first = ws.post(WS_SUBMIT, json=body | {"enable_sync_mode": True}).json()["data"]["outputs"]
    again = ws.post(WS_SUBMIT, json=body | {"enable_sync_mode": True}).json()["data"]["outputs"]
    assert first == again and first[0] != first[1]


# --------------------------------------------------------------------------- lifecycle


async def test_async_context_manager() -> None:
    sim = SimulatorServer("vibedream", SimConfig(api_key=None))
    async with sim, httpx.AsyncClient() as client:
        r = await client.post(f"{sim.base_url}{VD_SUBMIT}", json={"prompt": "p"})
        assert r.status_code == 200
    assert sim.stats["submits"] == 1


def test_stop_is_bounded_with_held_requests() -> None:
    sim = SimulatorServer("wavespeed", SimConfig(sync_give_up_s=60))
    sim.start()
    errors: list[BaseException] = []

    def held(body: dict[str, Any]) -> None:
        try:
            httpx.post(f"{sim.base_url}{WS_SUBMIT}", json=body, headers=AUTH, timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    sync_body = {"prompt": "p [sim:latency=30]", "enable_sync_mode": True}
    threads = [
        threading.Thread(target=held, args=({"prompt": "p [sim:hang]"},)),
        threading.Thread(target=held, args=(sync_body,)),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2
    while sim.stats["submits"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 3.0
    for t in threads:
        t.join(5)
        assert not t.is_alive()


# --------------------------------------------------------------------------- billing log


def _billing(client: httpx.Client, base: str = "") -> dict[str, Any]:
    r = client.get(f"{base}/_sim/billing")
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def _settle(client: httpx.Client, n: int, base: str = "") -> dict[str, Any]:
    """The billing log once it lists `n` tasks, all final."""
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        log = _billing(client, base)
        if log["count"] == n and all(t["final"] for t in log["tasks"]):
            return log
        time.sleep(0.02)
    raise AssertionError(f"the billing log never settled: {_billing(client, base)}")


def _task_id(kind: str, answer: httpx.Response) -> str:
    body = answer.json()
    return str(body["data"]["id"] if kind == "wavespeed" else body["id"])


# What each upstream charges, micro-USD: VibeDream its quoted costCents (2 per image by
# default), failed jobs too; WaveSpeed 12,000 per image, failed tasks nothing.
PRICE = {"vibedream": 20_000, "wavespeed": 12_000}
BILLS_FAILED = {"vibedream": True, "wavespeed": False}


@KINDS
def test_billing_log_matches_what_was_submitted(
    fresh: dict[str, SimulatorServer], post: Post, pool: httpx.Client, kind: str
) -> None:
    sim = fresh[kind]
    url = sim.base_url + SUBMIT[kind]
    accepted = {  # prompt -> (num_images, ends failed)
        "plain": (1, False), "four": (4, False), "[sim:moderate] two": (2, True),
        "[sim:fail-after-accept] three": (3, True),
    }  # fmt: skip
    ids = {}
    for prompt, (n, _) in accepted.items():
        r = pool.post(url, json={"prompt": prompt, "num_images": n})
        assert r.status_code == 200
        ids[_task_id(kind, r)] = prompt
    # Refused before any task exists: nothing is billed for these.
    assert post(kind, "p [sim:429]").status_code == 429
    assert post(kind, "p [sim:503]").status_code == 503
    assert post(kind, "p [sim:malformed]").status_code == 200
    assert pool.post(url, json={"prompt": "p", "num_images": 9}).status_code == 400
    with pytest.raises(httpx.RemoteProtocolError):
        post(kind, "p [sim:drop]")
    log = _settle(pool, len(accepted), sim.base_url)
    assert log["kind"] == kind and log["unit"] == "micro_usd"
    assert log["refunds_failed"] is not BILLS_FAILED[kind]
    assert [t["task_id"] for t in log["tasks"]] == list(ids)  # oldest first
    total = 0
    for task in log["tasks"]:
        prompt = ids[task["task_id"]]
        n, fails = accepted[prompt]
        price = PRICE[kind] * n
        charged = 0 if fails and not BILLS_FAILED[kind] else price
        total += charged
        assert task["prompt"] == prompt and task["num_images"] == n
        assert task["price_micro_usd"] == price and task["charged_micro_usd"] == charged
        assert task["status"] == ("failed" if fails else "completed")
        assert task["answered"] is True and task["sync"] is False
        assert ISO.match(task["created_at"])
    assert log["total_charged_micro_usd"] == log["charged_micro_usd"] == total
    assert log["evicted"] == 0
    assert sim.billing == _billing(pool, sim.base_url)  # the in-process view is the same
    assert sim.stats["jobs"] == len(accepted)


@KINDS
def test_drop_after_accept_task_exists_and_is_billed(
    fresh: dict[str, SimulatorServer], post: Post, pool: httpx.Client, kind: str
) -> None:
    sim = fresh[kind]
    with pytest.raises(httpx.RemoteProtocolError):  # no answer at all: no id for the client
        pool.post(
            sim.base_url + SUBMIT[kind],
            json={"prompt": "p [sim:drop-after-accept]", "num_images": 2},
        )
    sim.config.drop_after_accept = True
    with pytest.raises(httpx.RemoteProtocolError):
        post(kind, "q")
    sim.config.drop_after_accept = False
    log = _settle(pool, 2, sim.base_url)
    first, second = log["tasks"]
    assert first["answered"] is second["answered"] is False
    assert (first["num_images"], second["num_images"]) == (2, 1)
    assert first["charged_micro_usd"] == PRICE[kind] * 2
    assert second["charged_micro_usd"] == PRICE[kind]
    assert log["total_charged_micro_usd"] == PRICE[kind] * 3
    assert sim.stats["jobs"] == 2
    # The task is real: polled by the id from the log, it completed.
    poll = (
        f"/api/v3/predictions/{first['task_id']}/result"
        if kind == "wavespeed"
        else f"/api/v1/predictions/{first['task_id']}"
    )
    body = pool.get(sim.base_url + poll).json()
    data = body["data"] if kind == "wavespeed" else body
    assert data["status"] == "completed" and len(data["outputs"]) == 2


def test_billing_sync_mode_client_gone(ws: httpx.Client) -> None:
    """A client that leaves a sync-mode wait never learns the id; the task goes on."""
    body = {"prompt": "p [sim:latency=0.4]", "enable_sync_mode": True, "num_images": 3}
    with pytest.raises(httpx.ReadTimeout):
        ws.post(WS_SUBMIT, json=body, timeout=httpx.Timeout(5.0, read=0.1))
    ws.post(WS_SUBMIT, json=body | {"prompt": "p"})  # answered: completed in the answer
    log = _settle(ws, 2)
    gone, answered = log["tasks"]
    assert (gone["answered"], answered["answered"]) == (False, True)
    assert gone["sync"] is answered["sync"] is True
    assert gone["status"] == answered["status"] == "completed"
    assert gone["charged_micro_usd"] == answered["charged_micro_usd"] == 36_000


def test_billing_prices_follow_the_knobs(
    vd: httpx.Client, ws: httpx.Client, servers: dict[str, SimulatorServer]
) -> None:
    assert vd.post("/_sim/config", json={"cost_cents": 3}).status_code == 200
    sub = vd.post(VD_SUBMIT, json={"prompt": "p", "num_images": 2}).json()
    assert sub["costCents"] == 6  # the quote and the log agree
    ws.post("/_sim/config", json={"price_micro_usd_per_image": 25_000})
    ws.post(WS_SUBMIT, json={"prompt": "p", "num_images": 2})
    ws.post(WS_SUBMIT, json={"prompt": "p [sim:status=cancelled]"})
    vd_log, ws_log = _settle(vd, 1), _settle(ws, 2)
    assert vd_log["tasks"][0]["charged_micro_usd"] == 60_000
    assert [t["charged_micro_usd"] for t in ws_log["tasks"]] == [50_000, 0]
    assert [t["status"] for t in ws_log["tasks"]] == ["completed", "cancelled"]
    # A later price change does not re-price tasks already accepted.
    vd.post("/_sim/config", json={"cost_cents": 10})
    assert _billing(vd)["tasks"][0]["charged_micro_usd"] == 60_000
    # Reset empties the log (and restores the creation prices).
    assert vd.post("/_sim/reset").status_code == 200
    assert _billing(vd)["count"] == 0 and _billing(vd)["total_charged_micro_usd"] == 0
    assert servers["vibedream"].config.cost_cents == 2


def test_billing_log_is_bounded_but_totals_are_not(
    ws: httpx.Client, servers: dict[str, SimulatorServer]
) -> None:
    servers["wavespeed"].config.max_jobs = 2
    for n in (1, 2, 3):
        ws.post(WS_SUBMIT, json={"prompt": "p", "num_images": n, "enable_sync_mode": True})
    log = _billing(ws)
    assert [t["num_images"] for t in log["tasks"]] == [2, 3]
    assert log["evicted"] == 1 and log["evicted_charged_micro_usd"] == 12_000
    assert log["total_charged_micro_usd"] == 12_000 * 6


def test_module_main_refuses_bad_config() -> None:
    from providers.simulators.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["wavespeed", "--config", '{"no_such_knob": 1}'])
    assert exc.value.code == 2
