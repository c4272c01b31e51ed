"""The local GPU worker: queue, batching, cancel, validation, SSRF, auth, outputs.

Most tests run the worker app (in-process ASGI) in front of `FakeEngine`, a test
double of the engine seam (`run(jobs, on_step=...)`, sleeping per step). The last
ones load the real tiny FLUX pipeline (`providers.local.tiny`) on the CPU.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from PIL import Image

pytest.importorskip("torch", reason="the local worker needs the `local` extra (torch)")
pytest.importorskip("diffusers", reason="the local worker needs the `local` extra (diffusers)")

from providers.local.engine import Canceled, JobSpec
from providers.local.worker.app import create_worker_app
from providers.local.worker.settings import WorkerConfigError, WorkerSettings

BASE = "http://worker.test"
TOKEN = "worker-secret-token"


@pytest.fixture(autouse=True)
def _no_worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FLUX_WORKER_"):
            monkeypatch.delenv(name, raising=False)


class FakeEngine:
    """The engine seam, minus torch: sleeps `step_s` per step, solid-colour images."""

    def __init__(self, step_s: float = 0.005, fail: Exception | None = None) -> None:
        self.step_s = step_s
        self.fail = fail
        self.calls: list[list[JobSpec]] = []
        self.stopped_at: list[tuple[int, int]] = []  # (step, total) of canceled calls
        self.inputs: dict[str, tuple[Any, ...]] = {}  # mode -> (image size, mask, strength)
        self._lock = threading.Lock()

    def run(self, jobs: list[JobSpec], *, on_step: Callable[[int, int], bool] | None = None
            ) -> list[list[Image.Image]]:
        with self._lock:
            self.calls.append(list(jobs))
            for j in jobs:  # the queue drops the input images once the batch is done
                self.inputs[j.mode] = (j.image and j.image.size, j.mask is not None, j.strength)
            if self.fail is not None:
                raise self.fail
            total = jobs[0].steps
            for step in range(1, total + 1):
                time.sleep(self.step_s)
                if on_step is not None and on_step(step, total) is False:
                    self.stopped_at.append((step, total))
                    raise Canceled(step, total)
            return [[Image.new("RGB", (j.width, j.height), (200, 30 + i, 30)) for i in
                     range(j.num_images)] for j in jobs]

    def device_info(self) -> dict[str, Any]:
        return {"device": "fake", "dtype": "fp32"}


class FlagAll:
    def __init__(self) -> None:
        self.seen = 0

    def check(self, images: list[Image.Image]) -> list[bool]:
        self.seen += len(images)
        return [True] * len(images)


def settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {"safety_checker": "none", "warmup": False,
                              "batch_window_ms": 0, "log_level": "warning"}
    return WorkerSettings(**(values | overrides))


@asynccontextmanager
async def worker(engine: Any = None, *, checker: Any = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 **overrides: Any) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_worker_app(settings(**overrides), engine=engine or FakeEngine(),
                            checker=checker, transport=transport)
    async with AsyncTestClient(app, base_url=BASE) as client:
        yield client


def job_body(**extra: Any) -> dict[str, Any]:
    return {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 4,
            "guidance_scale": 3.5, "num_images": 1, "seed": 7, "output_format": "png",
            **extra}


async def submit(c: AsyncTestClient[Any], **extra: Any) -> str:
    r = await c.post("/v1/jobs", json=job_body(**extra))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def wait_until(c: AsyncTestClient[Any], job_id: str, done: Callable[[dict[str, Any]], bool],
                     timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        r = await c.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if done(body):
            return body
        assert time.monotonic() < deadline, f"timed out; last state {body}"
        await asyncio.sleep(0.01)


async def finished(c: AsyncTestClient[Any], job_id: str, timeout_s: float = 10.0
                   ) -> dict[str, Any]:
    return await wait_until(c, job_id, lambda b: b["status"] in
                            ("completed", "failed", "canceled"), timeout_s)


def png_data_uri(size: tuple[int, int] = (32, 32)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decode(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


# --------------------------------------------------------------------------- batching


async def test_two_compatible_jobs_run_as_one_batch() -> None:
    engine = FakeEngine()
    async with worker(engine, batch_window_ms=300) as c:
        a, b = await asyncio.gather(submit(c, seed=1), submit(c, seed=2, num_images=2))
        ja, jb = await finished(c, a), await finished(c, b)
        metrics = (await c.get("/metrics")).text
    assert ja["status"] == jb["status"] == "completed"
    assert len(engine.calls) == 1 and {s.seed for s in engine.calls[0]} == {1, 2}
    assert ja["batch"]["id"] == jb["batch"]["id"]
    assert ja["batch"]["size"] == jb["batch"]["size"] == 2 and ja["batch"]["images"] == 3
    assert len(ja["outputs"]) == 1 and len(jb["outputs"]) == 2
    # GPU-seconds: the batch's device time split by images (1 : 2).
    assert ja["gpu_seconds"] > 0 and jb["gpu_seconds"] == pytest.approx(2 * ja["gpu_seconds"],
                                                                         rel=0.01, abs=1e-5)
    assert metric(metrics, "flux_worker_batch_jobs_count") == 1
    assert metric(metrics, "flux_worker_batch_jobs_sum") == 2
    assert metric(metrics, "flux_worker_batch_images_sum") == 3
    assert metric(metrics, "flux_worker_images_total") == 3
    assert 'flux_worker_jobs_total{status="completed"} 2.0' in metrics


async def test_incompatible_jobs_run_separately_and_cap_counts_images() -> None:
    engine = FakeEngine()
    async with worker(engine, batch_window_ms=200, max_batch_size=2) as c:
        ids = await asyncio.gather(submit(c), submit(c, num_inference_steps=3),
                                   submit(c, num_images=2))
        jobs = [await finished(c, i) for i in ids]
    assert [j["status"] for j in jobs] == ["completed"] * 3
    # Different steps never share a call; 1 + 2 images exceed the cap of 2 images.
    assert sorted(len(call) for call in engine.calls) == [1, 1, 1]
    assert all(j["batch"]["size"] == 1 for j in jobs)


async def test_progress_is_reported_between_steps() -> None:
    async with worker(FakeEngine(step_s=0.03)) as c:
        job_id = await submit(c, num_inference_steps=12)
        running = await wait_until(c, job_id, lambda b: b["progress"]["step"] >= 2)
        done = await finished(c, job_id)
    assert running["status"] == "running" and running["progress"]["total"] == 12
    assert running["progress"]["step"] < 12
    assert done["progress"] == {"step": 12, "total": 12}
    assert done["timings"]["inference_ms"] > 0 and done["timings"]["queue_ms"] >= 0


# --------------------------------------------------------------------------- cancel


async def test_cancel_queued_job_is_removed_at_once() -> None:
    engine = FakeEngine(step_s=0.02)
    async with worker(engine) as c:
        first = await submit(c, num_inference_steps=15)
        await wait_until(c, first, lambda b: b["status"] == "running")
        second = await submit(c, width=128)  # incompatible: waits in the queue
        queued = (await c.get(f"/v1/jobs/{second}")).json()
        assert queued["status"] == "queued" and queued["queue_position"] == 0
        r = await c.post(f"/v1/jobs/{second}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "canceled"
        assert (await finished(c, first))["status"] == "completed"
        health = (await c.get("/health")).json()
    assert len(engine.calls) == 1  # the canceled job never ran
    assert health["queue_depth"] == 0 and health["running"] == 0


async def test_cancel_running_job_stops_between_steps() -> None:
    engine = FakeEngine(step_s=0.02)
    async with worker(engine) as c:
        job_id = await submit(c, num_inference_steps=50)
        await wait_until(c, job_id, lambda b: b["progress"]["step"] >= 2)
        r = await c.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "canceled"
        # The engine is free again: a following job runs to completion.
        after = await finished(c, await submit(c))
        job = (await c.get(f"/v1/jobs/{job_id}")).json()
        again = await c.post(f"/v1/jobs/{job_id}/cancel")
    assert after["status"] == "completed"
    [(step, total)] = engine.stopped_at
    assert 2 <= step < total == 50  # stopped between denoising steps, long before the end
    assert job["outputs"] == [] and job["gpu_seconds"] > 0  # pays for the steps it used
    assert again.status_code == 200  # idempotent


async def test_cancel_one_job_of_a_batch_keeps_the_other() -> None:
    engine = FakeEngine(step_s=0.02)
    async with worker(engine, batch_window_ms=300) as c:
        a, b = await asyncio.gather(submit(c, num_inference_steps=20, seed=1),
                                    submit(c, num_inference_steps=20, seed=2))
        await wait_until(c, a, lambda j: j["progress"]["step"] >= 2)
        assert (await c.post(f"/v1/jobs/{a}/cancel")).status_code == 200
        ja, jb = await finished(c, a), await finished(c, b)
    assert ja["status"] == "canceled" and ja["outputs"] == []
    assert jb["status"] == "completed" and len(jb["outputs"]) == 1
    assert engine.stopped_at == [] and len(engine.calls) == 1


async def test_cancel_completed_job_conflicts() -> None:
    async with worker() as c:
        job_id = await submit(c)
        await finished(c, job_id)
        r = await c.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


# --------------------------------------------------------------------------- limits


async def test_full_queue_answers_503_with_retry_after() -> None:
    async with worker(FakeEngine(step_s=0.02), max_queue=1) as c:
        first = await submit(c, num_inference_steps=25)
        await wait_until(c, first, lambda b: b["status"] == "running")
        await submit(c)  # fills the queue
        r = await c.post("/v1/jobs", json=job_body())
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "unavailable"
        health = (await c.get("/health")).json()
        metrics = (await c.get("/metrics")).text
    assert health["queue_depth"] == 1 and health["running"] == 1
    assert 'flux_worker_jobs_rejected_total{reason="queue_full"} 1.0' in metrics


async def test_finished_jobs_expire_after_ttl() -> None:
    async with worker(job_ttl_s=0.2) as c:
        job_id = await submit(c)
        await finished(c, job_id)
        await asyncio.sleep(0.3)
        r = await c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 404


async def test_unknown_jobs_are_404() -> None:
    async with worker() as c:
        job_id = await submit(c)
        await finished(c, job_id)
        responses = [await c.get("/v1/jobs/nope"), await c.post("/v1/jobs/nope/cancel"),
                     await c.get("/v1/jobs/nope/outputs/0.png"),
                     await c.get(f"/v1/jobs/{job_id}/outputs/5.png"),
                     await c.get(f"/v1/jobs/{job_id}/outputs/0.jpg")]
    assert [r.status_code for r in responses] == [404] * 5
    assert responses[0].json()["error"]["code"] == "not_found"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"width": 32}, "width"),
        ({"height": 2048}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 51}, "num_inference_steps"),
        ({"num_images": 5}, "num_images"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"seed": 1.5}, "seed"),
        ({"output_format": "gif"}, "output_format"),
        ({"output": "s3"}, "output"),
        ({"strength": 0}, "strength"),
        ({"enable_safety_checker": "yes"}, "enable_safety_checker"),
        ({"mask_image": png_data_uri()}, "mask_image"),
        ({"steps": 4}, "steps"),
    ],
)
async def test_invalid_requests_are_422_with_field(changes: dict[str, Any], field: str) -> None:
    engine = FakeEngine()
    async with worker(engine) as c:
        r = await c.post("/v1/jobs", json=job_body(**changes))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_error"
    [detail] = [d for d in error["details"] if d["field"] == field]
    assert detail["reason"] and "value" in detail
    assert engine.calls == []


async def test_not_json_is_400() -> None:
    async with worker() as c:
        r = await c.post("/v1/jobs", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image", "http://127.0.0.1/x.png"),
        ("image", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
        ("image", "http://[::1]:8090/x.png"),
        ("image", "file:///etc/passwd"),
        ("image", "data:image/png;base64,AAAA"),
        ("image", "data:image/png;base64,!!!not-base64!!!"),
        ("image", "data:text/html;base64,PGgxPmhpPC9oMT4="),
        ("mask_image", "http://10.0.0.8/mask.png"),
    ],
)
async def test_bad_input_images_and_ssrf_urls_are_refused(field: str, value: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"\x89PNG")

    engine = FakeEngine()
    body = {"image": png_data_uri(), field: value}
    async with worker(engine, transport=httpx.MockTransport(handler)) as c:
        r = await c.post("/v1/jobs", json=job_body(**body))
        health = (await c.get("/health")).json()
    assert r.status_code == 422, r.text
    [detail] = r.json()["error"]["details"]
    assert detail["field"] == field and detail["reason"]
    assert seen == [] and engine.calls == [] and health["queue_depth"] == 0


async def test_image_to_image_and_inpainting_get_decoded_inputs() -> None:
    engine = FakeEngine()
    async with worker(engine) as c:
        i2i = await submit(c, image=png_data_uri((48, 40)), strength=0.5)
        inpaint = await submit(c, image=png_data_uri(), mask_image=png_data_uri())
        await finished(c, i2i)
        await finished(c, inpaint)
    assert engine.inputs["image-to-image"] == ((48, 40), False, 0.5)
    assert engine.inputs["inpainting"] == ((32, 32), True, 0.8)


# --------------------------------------------------------------------------- outputs


async def test_base64_and_url_outputs() -> None:
    async with worker() as c:
        b64 = await finished(c, await submit(c, output="base64", width=80, height=72))
        url = await finished(c, await submit(c, output_format="jpeg"))
        fetched = await c.get(url["outputs"][0])
    assert decode(b64["outputs"][0]).size == (80, 72)
    assert b64["outputs"][0].startswith("data:image/png;base64,")
    assert url["outputs"] == [f"{BASE}/v1/jobs/{url['id']}/outputs/0.jpg"]
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(fetched.content)).format == "JPEG"
    assert url["has_nsfw_contents"] == [False] and url["seed"] == 7


async def test_random_seed_is_reported() -> None:
    async with worker() as c:
        job = await finished(c, await submit(c, seed=-1))
    assert isinstance(job["seed"], int) and 0 <= job["seed"] <= 2_147_483_647


async def test_safety_flags_and_blackout_policy() -> None:
    checker = FlagAll()
    async with worker(checker=checker, nsfw_policy="blackout") as c:
        flagged = await finished(c, await submit(c, output="base64", num_images=2))
        unchecked = await finished(c, await submit(c, output="base64",
                                                   enable_safety_checker=False))
        metrics = (await c.get("/metrics")).text
    assert flagged["has_nsfw_contents"] == [True, True] and flagged["safety_checked"]
    assert all(decode(o).convert("RGB").getextrema() == ((0, 0),) * 3
               for o in flagged["outputs"])
    assert unchecked["has_nsfw_contents"] == [False] and not unchecked["safety_checked"]
    assert decode(unchecked["outputs"][0]).convert("RGB").getpixel((0, 0)) == (200, 30, 30)
    assert checker.seen == 2
    assert metric(metrics, "flux_worker_nsfw_images_total") == 2


async def test_engine_failure_fails_the_job_as_internal() -> None:
    async with worker(FakeEngine(fail=RuntimeError("CUDA out of memory. Tried to allocate"))) as c:
        job = await finished(c, await submit(c))
    assert job["status"] == "failed" and job["error_kind"] == "internal"
    assert job["error"] == "the GPU ran out of memory" and job["outputs"] == []


# --------------------------------------------------------------------------- auth, health


async def test_bearer_token_guards_every_route_but_health_and_metrics() -> None:
    async with worker(token=TOKEN) as c:
        anonymous = await c.post("/v1/jobs", json=job_body())
        wrong = await c.post("/v1/jobs", json=job_body(),
                             headers={"Authorization": "Bearer nope"})
        ok = await c.post("/v1/jobs", json=job_body(), headers={"Authorization": f"Bearer {TOKEN}"})
        poll_anonymous = await c.get(f"/v1/jobs/{ok.json()['id']}")
        health = await c.get("/health")
        metrics = await c.get("/metrics")
    assert anonymous.status_code == wrong.status_code == poll_anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert ok.status_code == 202
    assert health.status_code == 200 and metrics.status_code == 200


async def test_health_reports_queue_and_device() -> None:
    async with worker(max_batch_size=3) as c:
        body = (await c.get("/health")).json()
    assert body == {"status": "ok", "queue_depth": 0, "running": 0, "max_batch_size": 3,
                    "max_queue": 64, "device": {"device": "fake", "dtype": "fp32"}}


def test_start_up_problems_are_explained(tmp_path: Path) -> None:
    with pytest.raises(WorkerConfigError, match="Falconsai/nsfw_image_detection"):
        WorkerSettings(model_path=tmp_path).check(need_model=False)
    with pytest.raises(WorkerConfigError, match=r"model_index\.json"):
        WorkerSettings(model_path=tmp_path, safety_checker="none").check()
    with pytest.raises(WorkerConfigError, match="--model"):
        WorkerSettings(safety_checker="none").check()


async def test_env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_WORKER_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("FLUX_WORKER_TOKEN", "t0ken")
    monkeypatch.setenv("FLUX_WORKER_NSFW_POLICY", "blackout")
    s = WorkerSettings()
    assert s.max_batch_size == 8 and s.nsfw_policy == "blackout"
    assert s.token is not None and s.token.get_secret_value() == "t0ken"


# --------------------------------------------------------------------------- real tiny FLUX


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny random FLUX pipeline and NSFW classifier, built once per session."""
    from providers.local.tiny import build_tiny_flux, build_tiny_nsfw_classifier

    root = tmp_path_factory.mktemp("tiny-models")
    return {"flux": build_tiny_flux(root / "flux"),
            "nsfw": build_tiny_nsfw_classifier(root / "nsfw", flag_everything=True)}


@asynccontextmanager
async def real_worker(models: dict[str, Path], **overrides: Any
                      ) -> AsyncIterator[AsyncTestClient[Any]]:
    values: dict[str, Any] = {"model_path": models["flux"], "device": "cpu", "dtype": "fp32",
                              "warmup": False, "log_level": "warning"}
    app = create_worker_app(WorkerSettings(**(values | overrides)))
    async with AsyncTestClient(app, base_url=BASE) as client:
        yield client


async def test_tiny_flux_end_to_end_and_batching(tiny_models: dict[str, Path]) -> None:
    async with real_worker(tiny_models, safety_checker="none", warmup=True,
                           batch_window_ms=500) as c:
        device = (await c.get("/health")).json()["device"]
        single = await finished(c, await submit(c, width=80, height=72, num_inference_steps=2,
                                                output_format="png"), timeout_s=60)
        image = Image.open(io.BytesIO((await c.get(single["outputs"][0])).content))
        pair = await asyncio.gather(submit(c, num_inference_steps=2, seed=1),
                                    submit(c, num_inference_steps=2, seed=2))
        a, b = [await finished(c, i, timeout_s=60) for i in pair]
        metrics = (await c.get("/metrics")).text
    assert device["device"] == "cpu" and device["dtype"] == "fp32"
    assert single["status"] == "completed", single
    assert image.format == "PNG" and image.size == (80, 72)
    assert single["progress"] == {"step": 2, "total": 2} and single["gpu_seconds"] > 0
    assert a["status"] == b["status"] == "completed"
    assert a["batch"]["id"] == b["batch"]["id"] and a["batch"]["size"] == 2
    assert metric(metrics, "flux_worker_batch_jobs_sum") == 3  # 1 + 2 jobs in 2 calls
    assert metric(metrics, "flux_worker_batch_jobs_count") == 2


async def test_tiny_nsfw_classifier_flags_and_blacks_out(tiny_models: dict[str, Path]) -> None:
    async with real_worker(tiny_models, safety_checker="vit",
                           safety_model_path=tiny_models["nsfw"], nsfw_policy="blackout") as c:
        job = await finished(c, await submit(c, num_inference_steps=1, num_images=2,
                                             output="base64"), timeout_s=60)
    assert job["status"] == "completed", job
    assert job["has_nsfw_contents"] == [True, True]
    for uri in job["outputs"]:
        assert decode(uri).convert("RGB").getextrema() == ((0, 0),) * 3


async def test_bad_model_folder_fails_start_up(tmp_path: Path) -> None:
    app = create_worker_app(WorkerSettings(model_path=tmp_path, safety_checker="none"))
    with pytest.raises(Exception) as info:  # the lifespan may wrap it in a group
        async with AsyncTestClient(app, base_url=BASE):
            pass
    if isinstance(info.value, BaseExceptionGroup):
        assert info.group_contains(WorkerConfigError, match="model_index", depth=None)
    else:
        assert info.errisinstance(WorkerConfigError) and "model_index" in str(info.value)
