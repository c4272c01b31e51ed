"""Load the engine and the NSFW checker from the worker settings (blocking; torch).

"auto" choices: device -> cuda when torch sees a GPU, else cpu; dtype -> bf16 on
cuda, fp32 on cpu; a speed option set to "auto" -> on where the device supports it
(tf32 and fp8 by compute capability, the rest on any CUDA device, none on CPU).

This module imports without torch: ``worker.engine`` (torch, diffusers) is
imported inside the functions, and its absence is a :class:`WorkerConfigError`
that names the missing extra.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from common.logging import get_logger

from .safety import SafetyCheckerError, build_checker
from .settings import ML_EXTRA_HINT, WorkerConfigError, WorkerSettings
from .spec import EngineError

log = get_logger("flux_worker.loader")

_MIN_CAPABILITY = {"tf32": (8, 0), "fp8": (8, 9)}


@contextmanager
def _needs_engine() -> Iterator[None]:
    """Around ``worker.engine`` imports: a missing torch/diffusers is a start-up problem."""
    try:
        yield
    except ImportError as exc:
        raise WorkerConfigError(f"the engine needs the worker's ML extra ({exc}): "
                                + ML_EXTRA_HINT) from exc


def resolve_device(settings: WorkerSettings) -> str:
    if settings.device == "cpu":
        return "cpu"
    with _needs_engine():
        from .engine.devices import cuda_available, torch_version

    if settings.device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if settings.device == "cuda" and not cuda_available():
        raise WorkerConfigError("device=cuda but torch sees no CUDA GPU (torch "
                                f"{torch_version()}); use --device cpu or a CUDA build")
    return settings.device


def resolve_dtype(settings: WorkerSettings, device: str) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return "bf16" if device == "cuda" else "fp32"


def speed_options(settings: WorkerSettings, device: str) -> Any:
    """The engine's ``SpeedOptions`` for ``device`` (a ``worker.engine.SpeedOptions``)."""
    with _needs_engine():
        from .engine import SpeedOptions
        from .engine.devices import cuda_capability

    capability = cuda_capability() if device == "cuda" else (0, 0)
    values: dict[str, bool] = {}
    for name in ("compile", "channels_last", "tf32", "fuse_qkv", "fp8"):
        value = getattr(settings, name)
        if value == "auto":
            value = device == "cuda" and capability >= _MIN_CAPABILITY.get(name, (0, 0))
        values[name] = bool(value)
    return SpeedOptions(**values)


def load_engine(settings: WorkerSettings) -> Any:
    """Load the pipeline and run the warm-up (when enabled); clear errors on failure."""
    with _needs_engine():
        from .engine import FluxEngine
    if settings.model_path is None:
        raise WorkerConfigError("no model: pass --model PATH (or set FLUX_WORKER_MODEL_PATH)")
    device = resolve_device(settings)
    dtype = resolve_dtype(settings, device)
    options = speed_options(settings, device)
    log.info("engine.loading", path=str(settings.model_path), device=device, dtype=dtype,
             options=repr(options))
    try:
        engine = FluxEngine.load(settings.model_path, device=device, dtype=dtype,
                                 options=options)
        if settings.warmup:
            engine.warmup()
    except EngineError as exc:
        raise WorkerConfigError(f"could not load the model from {str(settings.model_path)!r}: "
                                f"{exc}") from exc
    log.info("engine.ready", device=engine.device_info(), warmup=settings.warmup)
    return engine


def load_checker(settings: WorkerSettings) -> Any:
    """The NSFW checker named by the settings (on the engine's device), or None."""
    if settings.safety_checker == "none":
        return None
    device = resolve_device(settings)
    try:
        return build_checker(settings.safety_checker, settings.safety_model_path, device=device,
                             threshold=settings.nsfw_threshold)
    except SafetyCheckerError as exc:
        raise WorkerConfigError(f"{exc}; or set FLUX_WORKER_SAFETY_CHECKER=none") from exc
