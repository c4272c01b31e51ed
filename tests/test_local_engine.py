"""The local FLUX engine on a tiny random pipeline, on CPU, with no download.

A session fixture writes a tiny FLUX.1-dev-layout model folder
(``worker.engine.tiny``) and the engine loads it like a real model. The
images are noise, but every path of the real diffusers pipelines runs.

Needs the `local` extra (torch, diffusers, transformers): the whole module is
skipped without it. What does not need the real pipeline (inputs, the safety
policy, the model-folder checks, the queue on a fake engine) is in
``test_local_worker.py`` and runs without torch.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: never the hub
NEEDS = "the real FLUX engine needs the `local` extra"
torch = pytest.importorskip("torch", reason=f"{NEEDS} (torch)")
pytest.importorskip("diffusers", reason=f"{NEEDS} (diffusers)")
pytest.importorskip("transformers", reason=f"{NEEDS} (transformers)")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from common.media import sniff_format  # noqa: E402
from worker.engine import FluxEngine, SpeedOptions  # noqa: E402
from worker.engine.tiny import build_tiny_flux, build_tiny_nsfw_classifier  # noqa: E402
from worker.engine.vit import ViTChecker  # noqa: E402
from worker.images import encode  # noqa: E402
from worker.safety import build_checker  # noqa: E402
from worker.spec import Canceled, EngineError, JobSpec  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy CI machine idle-spinning
    intra-op threads make these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def flux_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def engine(flux_path: Path) -> FluxEngine:
    return FluxEngine.load(flux_path, device="cpu", dtype="fp32")


def job(seed: int = 1, **overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "prompt": "a photo of a red cat",
        "mode": "text-to-image",
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance": 3.5,
        "num_images": 1,
        "seed": seed,
        "output_format": "png",
    }
    fields.update(overrides)
    return JobSpec(**fields)


def pixels(image: Image.Image) -> Any:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def same_image(a: Image.Image, b: Image.Image, *, tolerance: int = 2) -> bool:
    """Equal up to ``tolerance`` per channel value (batching may reorder float sums)."""
    return a.size == b.size and int(np.abs(pixels(a) - pixels(b)).max()) <= tolerance


def source_image(size: tuple[int, int] = (100, 80)) -> Image.Image:
    gradient = np.linspace(0, 255, size[0], dtype=np.uint8)
    rgb = np.stack([np.tile(gradient, (size[1], 1))] * 3, axis=-1)
    return Image.fromarray(rgb, "RGB")


def square_mask(size: tuple[int, int] = (30, 30)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return mask


# --- loading -------------------------------------------------------------------------------


def test_load_refuses_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="does not exist"):
        FluxEngine.load(tmp_path / "nowhere")


def test_load_refuses_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"no model_index\.json"):
        FluxEngine.load(tmp_path)


def test_load_refuses_other_pipeline_class(tmp_path: Path) -> None:
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(EngineError, match="StableDiffusionPipeline, not a FLUX"):
        FluxEngine.load(tmp_path)


def test_load_refuses_missing_component(tmp_path: Path, flux_path: Path) -> None:
    index = json.loads((flux_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(EngineError, match=r"scheduler/ sub-folder is missing"):
        FluxEngine.load(tmp_path)


@pytest.mark.parametrize(
    ("device", "dtype", "message"),
    [
        ("cpu", "fp8", "unknown dtype"),
        ("cpu", "fp16", "not supported on CPU"),
        ("tpu", "fp32", "device"),
    ],
)
def test_load_refuses_bad_device_or_dtype(
    flux_path: Path, device: str, dtype: str, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        FluxEngine.load(flux_path, device=device, dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_refuses_cuda_without_cuda(flux_path: Path) -> None:
    with pytest.raises(EngineError, match="CUDA is not available"):
        FluxEngine.load(flux_path, device="cuda")


def test_speed_options_on_cpu_apply_only_what_cpu_allows(flux_path: Path) -> None:
    everything = SpeedOptions(compile=True, channels_last=True, tf32=True, fuse_qkv=True, fp8=True)
    fast = FluxEngine.load(flux_path, options=everything)
    options = fast.device_info()["options"]
    assert isinstance(options, dict)
    assert options["fuse_qkv"] == "on"
    for name in ("compile", "channels_last", "tf32", "fp8"):
        assert options[name] == "skipped: needs CUDA"
    assert fast.run([job()])[0][0].size == (64, 64)


def test_bf16_survives_from_pipe_and_weights_are_shared(flux_path: Path) -> None:
    # diffusers' from_pipe casts the modules it shares to its own dtype argument
    # (default fp32): the engine must pass the load dtype through.
    bf16 = FluxEngine.load(flux_path, dtype="bf16")
    pipes = bf16._pipes  # white-box: the three pipelines must hold the same modules
    for mode in ("image-to-image", "inpainting"):
        assert pipes[mode].transformer is pipes["text-to-image"].transformer
        assert pipes[mode].text_encoder_2 is pipes["text-to-image"].text_encoder_2
    assert pipes["text-to-image"].transformer.dtype == torch.bfloat16
    assert pipes["text-to-image"].vae.dtype == torch.bfloat16
    [[image]] = bf16.run([job(mode="image-to-image", image=source_image())])
    assert image.size == (64, 64)


def test_device_info_and_warmup(engine: FluxEngine) -> None:
    engine.warmup(width=64, height=64)
    info = engine.device_info()
    assert info["device"] == "cpu" and info["dtype"] == "fp32"
    assert info["torch"] == torch.__version__
    assert engine.size_multiple == 16


# --- generation ----------------------------------------------------------------------------


def test_text_to_image_size_and_formats(engine: FluxEngine) -> None:
    [[image]] = engine.run([job()])
    assert image.size == (64, 64) and image.mode == "RGB"
    for fmt in ("jpeg", "png", "webp"):
        data = encode(image, fmt)
        assert sniff_format(data) == fmt
        assert Image.open(io.BytesIO(data)).size == (64, 64)


def test_size_off_the_grid_is_returned_as_requested(engine: FluxEngine) -> None:
    assert engine.pipeline_size(72, 100) == (80, 96)
    [[image]] = engine.run([job(width=72, height=100)])
    assert image.size == (72, 100)


def test_image_to_image(engine: FluxEngine) -> None:
    i2i = job(mode="image-to-image", image=source_image(), strength=0.5, width=96)
    [[image]] = engine.run([i2i])
    [[text_only]] = engine.run([job(width=96)])
    assert image.size == (96, 64)
    assert not same_image(image, text_only, tolerance=0)


def test_inpainting_with_mask_of_another_size(engine: FluxEngine) -> None:
    inpaint = job(mode="inpainting", image=source_image(), mask=square_mask((30, 30)), num_images=2)
    [images] = engine.run([inpaint])
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert not same_image(images[0], images[1], tolerance=0)


def test_same_seed_same_bytes_other_seed_differs(engine: FluxEngine) -> None:
    first = encode(engine.run([job(seed=42)])[0][0], "png")
    again = encode(engine.run([job(seed=42)])[0][0], "png")
    other = encode(engine.run([job(seed=43)])[0][0], "png")
    assert first == again
    assert first != other


def test_num_images_uses_seed_plus_index(engine: FluxEngine) -> None:
    [images] = engine.run([job(seed=7, num_images=3)])
    assert len(images) == 3
    assert len({encode(image, "png") for image in images}) == 3
    [[second_alone]] = engine.run([job(seed=8)])
    assert same_image(images[1], second_alone)


def test_batch_of_compatible_jobs_matches_single_runs(engine: FluxEngine) -> None:
    a, b = job(seed=1, prompt="a cat"), job(seed=2, prompt="a blue dog", num_images=2)
    assert a.batch_key() == b.batch_key()
    batched = engine.run([a, b])
    assert [len(images) for images in batched] == [1, 2]
    alone_a, alone_b = engine.run([a])[0], engine.run([b])[0]
    # On this CPU the bytes are identical; the tolerance covers other kernels.
    assert same_image(batched[0][0], alone_a[0])
    assert all(same_image(x, y) for x, y in zip(batched[1], alone_b, strict=True))


def test_batch_key_and_incompatible_jobs(engine: FluxEngine) -> None:
    assert job(strength=0.3).batch_key() == job(strength=0.9).batch_key()  # t2i ignores strength
    assert (
        job(mode="image-to-image", strength=0.3).batch_key()
        != job(mode="image-to-image", strength=0.9).batch_key()
    )
    with pytest.raises(ValueError, match="equal batch keys"):
        engine.run([job(), job(steps=3)])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "image-to-image"}, "needs an input image"),
        ({"mode": "inpainting", "image": Image.new("RGB", (8, 8))}, "needs a mask"),
        (
            {"mode": "image-to-image", "image": Image.new("RGB", (8, 8)), "strength": 1e-20},
            "no denoising step",
        ),
        ({"num_images": 0}, "num_images"),
    ],
)
def test_invalid_jobs_are_refused(
    engine: FluxEngine, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine.run([job(**overrides)])


def recorder(stop_at: int | None) -> tuple[list[tuple[int, int]], Callable[[int, int], bool]]:
    seen: list[tuple[int, int]] = []

    def on_step(step: int, total: int) -> bool:
        seen.append((step, total))
        return step != stop_at

    return seen, on_step


def test_on_step_reports_every_step(engine: FluxEngine) -> None:
    seen, on_step = recorder(stop_at=None)
    engine.run([job(steps=3)], on_step=on_step)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen, on_step = recorder(stop_at=None)
    i2i = job(mode="image-to-image", image=source_image(), strength=0.5, steps=4)
    engine.run([i2i], on_step=on_step)
    assert seen == [(1, 2), (2, 2)]  # strength 0.5 of 4 steps runs the last 2
    assert i2i.denoising_steps() == 2
    assert job(mode="image-to-image", strength=0.2, steps=2).denoising_steps() == 1  # rounds up


def test_cancel_between_steps(engine: FluxEngine) -> None:
    seen, on_step = recorder(stop_at=2)
    with pytest.raises(Canceled) as caught:
        engine.run([job(steps=4)], on_step=on_step)
    assert (caught.value.step, caught.value.total) == (2, 4)
    assert seen == [(1, 4), (2, 4)]
    assert engine.run([job()])[0][0].size == (64, 64)  # the engine still works afterwards


# --- safety --------------------------------------------------------------------------------


@pytest.mark.parametrize("flag_everything", [True, False])
def test_vit_checker_flags(tmp_path: Path, engine: FluxEngine, flag_everything: bool) -> None:
    folder = build_tiny_nsfw_classifier(tmp_path / "nsfw", flag_everything=flag_everything)
    checker = build_checker("vit", folder)
    assert isinstance(checker, ViTChecker)
    [images] = engine.run([job(num_images=2)])
    images.append(Image.new("RGB", (300, 200), (255, 255, 255)))
    assert checker.check(images) == [flag_everything] * 3
    scores = checker.scores(images)
    assert all((s > 0.85) == flag_everything for s in scores)


# --- the loader's "auto" choices -----------------------------------------------------------


def test_engine_reexports_the_torch_free_spec_types() -> None:
    import worker.engine
    import worker.spec

    for name in ("Canceled", "EngineError", "JobSpec", "Mode"):
        assert getattr(worker.engine, name) is getattr(worker.spec, name)


def test_auto_device_dtype_and_speed_options_follow_what_torch_sees() -> None:
    from worker.loader import resolve_device, resolve_dtype, speed_options
    from worker.settings import WorkerSettings

    auto = WorkerSettings(device="auto", compile="auto", fuse_qkv="auto", tf32="auto")
    device = resolve_device(auto)
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(auto, device) == ("bf16" if device == "cuda" else "fp32")
    cpu = speed_options(auto, "cpu")
    assert isinstance(cpu, SpeedOptions) and not (cpu.compile or cpu.fuse_qkv or cpu.tf32)
    assert speed_options(WorkerSettings(fuse_qkv=True), "cpu").fuse_qkv
