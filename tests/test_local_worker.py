"""The local GPU worker without torch: queue, batching, cancel, validation, SSRF, auth,
outputs, settings, inputs and the safety policy.

Most tests run the worker app (in-process ASGI) in front of `worker.testing.FakeEngine`,
the engine seam's test double (validates batches like the real engine, sleeps per
step, solid-colour images from the seed); none of them needs torch, so they run on
`pip install -e '.[test]'`. The last ones load the real tiny FLUX pipeline
(`worker.engine.tiny`) on the CPU and skip without the `local` extra.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from PIL import Image

from common.media import BlockedURL, MediaError, OutboundGuard
from worker.app import create_worker_app
from worker.inputs import load_input_image, prepare_mask, to_rgb
from worker.loader import load_engine, resolve_device
from worker.model_folder import REQUIRED_COMPONENTS, check_model_folder
from worker.safety import NoChecker, SafetyCheckerError, apply_policy, build_checker
from worker.settings import WorkerConfigError, WorkerSettings, missing_ml_packages
from worker.spec import Canceled, EngineError, JobSpec
from worker.testing import FakeChecker, FakeEngine, SeenInputs, fake_color

BASE = "http://worker.test"
TOKEN = "worker-secret-token"
STEP_S = 0.005  # the fake engine's seconds per step, unless a test says otherwise
REAL_PIPELINE = "the real tiny FLUX pipeline needs the `local` extra (torch, diffusers)"


@pytest.fixture(autouse=True)
def _no_worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FLUX_WORKER_"):
            monkeypatch.delenv(name, raising=False)


def settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {"safety_checker": "none", "warmup": False,
                              "batch_window_ms": 0, "log_level": "warning"}
    return WorkerSettings(**(values | overrides))


@asynccontextmanager
async def worker(engine: Any = None, *, checker: Any = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 **overrides: Any) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_worker_app(settings(**overrides), engine=engine or FakeEngine(step_s=STEP_S),
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
    engine = FakeEngine(step_s=STEP_S)
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
    engine = FakeEngine(step_s=STEP_S)
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
    engine = FakeEngine(step_s=STEP_S)
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

    engine = FakeEngine(step_s=STEP_S)
    body = {"image": png_data_uri(), field: value}
    async with worker(engine, transport=httpx.MockTransport(handler)) as c:
        r = await c.post("/v1/jobs", json=job_body(**body))
        health = (await c.get("/health")).json()
    assert r.status_code == 422, r.text
    [detail] = r.json()["error"]["details"]
    assert detail["field"] == field and detail["reason"]
    assert seen == [] and engine.calls == [] and health["queue_depth"] == 0


async def test_image_to_image_and_inpainting_get_decoded_inputs() -> None:
    engine = FakeEngine(step_s=STEP_S)
    async with worker(engine) as c:
        i2i = await submit(c, image=png_data_uri((48, 40)), strength=0.5)
        inpaint = await submit(c, image=png_data_uri(), mask_image=png_data_uri())
        await finished(c, i2i)
        await finished(c, inpaint)
    assert engine.inputs["image-to-image"] == SeenInputs((48, 40), None, 0.5)
    assert engine.inputs["inpainting"] == SeenInputs((32, 32), (32, 32), 0.8)


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
    checker = FakeChecker(flag_everything=True)
    async with worker(checker=checker, nsfw_policy="blackout") as c:
        flagged = await finished(c, await submit(c, output="base64", num_images=2))
        unchecked = await finished(c, await submit(c, output="base64",
                                                   enable_safety_checker=False))
        metrics = (await c.get("/metrics")).text
    assert flagged["has_nsfw_contents"] == [True, True] and flagged["safety_checked"]
    assert all(decode(o).convert("RGB").getextrema() == ((0, 0),) * 3
               for o in flagged["outputs"])
    assert unchecked["has_nsfw_contents"] == [False] and not unchecked["safety_checked"]
    assert decode(unchecked["outputs"][0]).convert("RGB").getpixel((0, 0)) == fake_color(7)
    assert checker.seen == 2
    assert metric(metrics, "flux_worker_nsfw_images_total") == 2


async def test_engine_failure_fails_the_job_as_internal() -> None:
    async with worker(FakeEngine(fail=RuntimeError("CUDA out of memory. Tried to allocate"))) as c:
        job = await finished(c, await submit(c))
    assert job["status"] == "failed" and job["error_kind"] == "internal"
    assert job["error"] == "the GPU ran out of memory" and job["outputs"] == []


async def test_engine_error_is_reported_and_progress_kept() -> None:
    engine = FakeEngine(step_s=STEP_S, fail=EngineError("the model folder vanished"),
                        fail_after_steps=2)
    async with worker(engine) as c:
        job = await finished(c, await submit(c))
        after = await finished(c, await submit(c, seed=8))
    assert job["status"] == "failed" and job["error_kind"] == "internal"
    assert job["error"] == "the model folder vanished"  # the engine's own words
    assert job["progress"] == {"step": 2, "total": 4} and job["gpu_seconds"] > 0
    assert after["status"] == "failed" and len(engine.calls) == 2  # the queue keeps going


async def test_unexpected_engine_errors_only_name_their_type() -> None:
    async with worker(FakeEngine(fail=KeyError("/secret/path/model.safetensors"))) as c:
        job = await finished(c, await submit(c))
    assert job["status"] == "failed" and job["error"] == "internal error (KeyError)"


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


def fake_model_folder(root: Path, *, class_name: str = "FluxPipeline",
                      components: tuple[str, ...] = REQUIRED_COMPONENTS,
                      folders: tuple[str, ...] = REQUIRED_COMPONENTS) -> Path:
    """A folder that passes (or, with fewer parts, fails) the model-folder check; no weights."""
    root.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": class_name}
    index |= {name: ["diffusers", "Whatever"] for name in components}
    (root / "model_index.json").write_text(json.dumps(index))
    for name in folders:
        (root / name).mkdir(exist_ok=True)
    return root


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nowhere", "does not exist"),
        (lambda p: p, r"no model_index\.json"),
        (lambda p: fake_model_folder(p, class_name="StableDiffusionPipeline"),
         "StableDiffusionPipeline, not a FLUX"),
        (lambda p: fake_model_folder(p, components=("scheduler",)), "lists no 'vae' component"),
        (lambda p: fake_model_folder(p, folders=()), r"scheduler/ sub-folder is missing"),
    ],
)
def test_model_folder_check_names_the_problem(tmp_path: Path, make: Callable[[Path], Path],
                                              message: str) -> None:
    with pytest.raises(WorkerConfigError, match=message):
        check_model_folder(make(tmp_path), error=WorkerConfigError)


def test_model_folder_check_accepts_a_flux_layout(tmp_path: Path) -> None:
    folder = fake_model_folder(tmp_path / "flux")
    assert check_model_folder(folder, error=WorkerConfigError) == folder.resolve()
    problems = WorkerSettings(model_path=folder, safety_checker="none").startup_problems()
    assert problems == ([] if not missing_ml_packages() else [
        f"the engine needs {', '.join(missing_ml_packages())} (the worker's ML extra): "
        "pip install 'flux-proxy[local]'"])


async def start_up_error(app: Litestar) -> BaseException:
    """What the app's lifespan raised at start-up (it may wrap it in a group)."""
    with pytest.raises(Exception) as info:
        async with AsyncTestClient(app, base_url=BASE):
            pass
    error: BaseException = info.value
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


async def test_bad_model_folder_fails_start_up(tmp_path: Path) -> None:
    app = create_worker_app(WorkerSettings(model_path=tmp_path, safety_checker="none"))
    error = await start_up_error(app)
    assert isinstance(error, WorkerConfigError) and "model_index" in str(error)


@pytest.fixture
def no_ml_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on `pip install flux-proxy` without [local], even where it is installed."""
    for name in ("torch", "diffusers", "transformers", "worker.engine", "worker.engine.flux",
                 "worker.engine.devices"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.usefixtures("no_ml_extra")
async def test_missing_ml_extra_is_a_start_up_problem(tmp_path: Path) -> None:
    settings = WorkerSettings(model_path=fake_model_folder(tmp_path / "flux"),
                              safety_checker="none", warmup=False)
    assert missing_ml_packages() == ["torch", "diffusers", "transformers"]
    with pytest.raises(WorkerConfigError, match=r"needs torch, diffusers, transformers .*"
                       r"pip install 'flux-proxy\[local\]'"):
        settings.check()  # what `flux-proxy worker` runs before binding the port
    error = await start_up_error(create_worker_app(settings))
    assert isinstance(error, WorkerConfigError) and "flux-proxy[local]" in str(error)
    with pytest.raises(WorkerConfigError, match=r"ML extra .*flux-proxy\[local\]"):
        load_engine(settings)  # the loader says the same if it gets that far
    with pytest.raises(WorkerConfigError, match=r"flux-proxy\[local\]"):
        resolve_device(WorkerSettings(device="auto"))
    assert resolve_device(WorkerSettings(device="cpu")) == "cpu"


# --------------------------------------------------------------------------- inputs


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def no_traffic(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"unexpected request to {request.url}")


async def load(value: str, *, as_mask: bool = False) -> Image.Image:
    async with httpx.AsyncClient(transport=httpx.MockTransport(no_traffic)) as client:
        return await load_input_image(
            value,
            field="mask_image" if as_mask else "image",
            client=client,
            guard=OutboundGuard(),
            max_bytes=1 << 20,
            timeout_s=5,
            as_mask=as_mask,
        )


def gradient_image(size: tuple[int, int] = (100, 80)) -> Image.Image:
    return Image.linear_gradient("L").resize(size).convert("RGB")


async def test_transparent_mask_areas_are_kept_not_repainted() -> None:
    # Left half opaque white (repaint), right half fully transparent (keep).
    mask = Image.new("RGBA", (40, 20), (255, 255, 255, 0))
    mask.paste((255, 255, 255, 255), (0, 0, 20, 20))
    prepared = prepare_mask(await load(data_uri(mask), as_mask=True), (40, 20))
    assert prepared.getpixel((5, 10)) == 255 and prepared.getpixel((35, 10)) == 0


async def test_input_data_uri_is_loaded_as_rgb() -> None:
    image = await load(data_uri(Image.new("RGBA", (40, 30), (255, 0, 0, 128))))
    assert image.mode == "RGB" and image.size == (40, 30)


async def test_input_garbage_data_uri_is_refused_with_field() -> None:
    with pytest.raises(MediaError) as caught:
        await load("data:image/png;base64," + base64.b64encode(b"not an image at all").decode())
    assert caught.value.field == "image"


async def test_input_loopback_url_is_refused_without_traffic() -> None:
    with pytest.raises(BlockedURL) as caught:
        await load("http://127.0.0.1:8080/cat.png")
    assert caught.value.field == "image"


def test_prepare_mask_resizes_and_binarises() -> None:
    soft = Image.linear_gradient("L").resize((30, 20))  # 0..255 top to bottom
    mask = prepare_mask(soft, (64, 48))
    assert mask.mode == "L" and mask.size == (64, 48)
    assert {value for _count, value in mask.getcolors() or []} == {0, 255}
    transparent = prepare_mask(Image.new("RGBA", (10, 10), (255, 255, 255, 0)), (10, 10))
    assert transparent.getextrema() == (0, 0)  # transparent = keep


def test_to_rgb_flattens_alpha_on_white() -> None:
    assert to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


# --------------------------------------------------------------------------- safety policy


def test_blackout_policy_replaces_only_flagged_images() -> None:
    images = [gradient_image((20, 10)), gradient_image((30, 12))]
    out = apply_policy(images, [True, False], "blackout")
    assert out[0].size == (20, 10) and out[0].getextrema() == ((0, 0),) * 3
    assert out[1] is images[1]
    assert apply_policy(images, [True, True], "flag") == images


def test_no_checker_and_checker_errors(tmp_path: Path) -> None:
    assert NoChecker().check([gradient_image()] * 2) == [False, False]
    assert isinstance(build_checker("none", None), NoChecker)
    with pytest.raises(SafetyCheckerError, match="needs the path"):
        build_checker("vit", None)
    with pytest.raises(SafetyCheckerError, match=r"no config\.json"):
        build_checker("vit", tmp_path)


def test_vit_checker_without_transformers_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as without the `local` extra
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SafetyCheckerError, match=r"pip install 'flux-proxy\[local\]'"):
        build_checker("vit", tmp_path)


def test_nudenet_missing_is_a_clear_error() -> None:
    try:
        import nudenet  # noqa: F401
    except ImportError:
        with pytest.raises(SafetyCheckerError, match="AGPL"):
            build_checker("nudenet", None)
    else:  # pragma: no cover - only where the optional extra is installed
        pytest.skip("nudenet is installed")


# --------------------------------------------------------------------------- the fake engine


def spec(seed: int = 1, **overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {"prompt": "a cat", "mode": "text-to-image", "width": 64,
                              "height": 48, "steps": 3, "guidance": 3.5, "num_images": 1,
                              "seed": seed, "output_format": "png"}
    return JobSpec(**(fields | overrides))


def test_fake_engine_images_depend_only_on_seed_plus_index() -> None:
    engine = FakeEngine()
    [three, one] = engine.run([spec(seed=7, num_images=3), spec(seed=8, prompt="a dog")])
    assert [image.size for image in three] == [(64, 48)] * 3
    assert [image.getpixel((0, 0)) for image in three] == [fake_color(7, i) for i in range(3)]
    assert len({fake_color(7, i) for i in range(3)}) == 3
    assert one[0].getpixel((0, 0)) == three[1].getpixel((0, 0)) == fake_color(8)
    assert engine.images_generated == 4 and engine.run([]) == []


def recorder(stop_at: int | None = None
             ) -> tuple[list[tuple[int, int]], Callable[[int, int], bool]]:
    seen: list[tuple[int, int]] = []

    def on_step(step: int, total: int) -> bool:
        seen.append((step, total))
        return step != stop_at

    return seen, on_step


def test_fake_engine_steps_cancel_and_validation_match_the_real_engine() -> None:
    engine = FakeEngine()
    seen, on_step = recorder(stop_at=2)
    with pytest.raises(Canceled) as caught:
        engine.run([spec(steps=4)], on_step=on_step)
    assert (caught.value.step, caught.value.total) == (2, 4) and seen == [(1, 4), (2, 4)]
    assert engine.stopped_at == [(2, 4)]
    seen, on_step = recorder()
    engine.run([spec(mode="image-to-image", image=gradient_image(), strength=0.5, steps=4)],
               on_step=on_step)
    assert seen == [(1, 2), (2, 2)]  # strength 0.5 of 4 steps: the last 2, as diffusers runs
    with pytest.raises(ValueError, match="equal batch keys"):
        engine.run([spec(), spec(steps=2)])
    with pytest.raises(ValueError, match="needs an input image"):
        engine.run([spec(mode="image-to-image")])


# --------------------------------------------------------------------------- import rules


def test_worker_imports_without_torch_and_without_the_proxy() -> None:
    """The HTTP side of the worker imports neither the ML stack nor proxy/providers."""
    script = textwrap.dedent("""
        import importlib, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED or name.startswith("worker.engine"):
                    raise ImportError(f"blocked: {name}")
                return None

        BLOCKED = {"torch", "diffusers", "transformers", "accelerate", "tokenizers",
                   "proxy", "providers"}
        sys.meta_path.insert(0, Block())
        for name in ("worker", "worker.app", "worker.main", "worker.loader", "worker.queue",
                     "worker.runner", "worker.jobs", "worker.wire", "worker.settings",
                     "worker.metrics", "worker.images", "worker.inputs", "worker.safety",
                     "worker.spec", "worker.model_folder", "worker.testing"):
            importlib.import_module(name)
        from worker.app import create_worker_app
        from worker.settings import WorkerSettings
        from worker.testing import FakeEngine
        create_worker_app(WorkerSettings(safety_checker="none"), engine=FakeEngine())
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# --------------------------------------------------------------------------- real tiny FLUX


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny random FLUX pipeline and NSFW classifier, built once per session."""
    pytest.importorskip("torch", reason=REAL_PIPELINE)
    pytest.importorskip("diffusers", reason=REAL_PIPELINE)
    pytest.importorskip("transformers", reason=REAL_PIPELINE)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the hub
    from worker.engine.tiny import build_tiny_flux, build_tiny_nsfw_classifier

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
