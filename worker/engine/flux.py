"""The FLUX engine: one set of weights, three pipelines, batched generation.

``FluxEngine.load`` reads a local diffusers folder (``local_files_only``; the
hub is never contacted) into a ``FluxPipeline`` and derives the img2img and
inpaint pipelines from it with ``from_pipe``, so every module is in memory
once. ``run`` turns a batch of compatible jobs into ONE pipeline call.

Reproducibility: image ``i`` of a job is drawn from its own CPU
``torch.Generator`` seeded ``seed + i``, so a seed reproduces the same image
whatever else shares the batch and whichever device runs it (CPU generators
give the same noise everywhere; the device's numerics may still differ).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..inputs import prepare_mask, resize_for, to_rgb
from ..model_folder import check_model_folder
from ..spec import Canceled, EngineError, JobSpec, Mode, check_batch
from .speed import SpeedOptions, apply_speed_options

__all__ = ["DTYPES", "FluxEngine"]

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
MAX_SEQUENCE_LENGTH = 512  # T5 tokens, as FLUX.1-dev was trained
_SEED_MASK = 2**64 - 1


class FluxEngine:
    """Text-to-image, image-to-image and inpainting on one loaded FLUX model.

    ``run`` may be called from any thread; calls are serialised (the three
    pipelines share a scheduler and per-call state).
    """

    def __init__(
        self,
        pipes: dict[Mode, Any],
        *,
        path: Path,
        device: str,
        dtype: str,
        applied: dict[str, str],
    ) -> None:
        self._pipes = pipes
        self._path = path
        self._device = device
        self._dtype = dtype
        self._applied = applied
        self._lock = threading.Lock()
        base = pipes["text-to-image"]
        self.size_multiple: int = int(base.vae_scale_factor) * 2  # VAE downscale x 2x2 packing

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "fp32",
        options: SpeedOptions = SpeedOptions(),  # noqa: B008 - frozen, immutable
    ) -> FluxEngine:
        """Load the FLUX model folder at ``path`` onto ``device``.

        ``dtype`` is ``bf16`` (what FLUX.1-dev ships; recommended on GPUs),
        ``fp16`` (CUDA only; FLUX's T5 tends to overflow in fp16) or ``fp32``.
        On CPU ``fp32`` and ``bf16`` are accepted (bf16 is slow without
        native bf16 instructions). Raises :class:`EngineError` with a
        readable reason for a missing or wrong folder, device or dtype.
        """
        from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

        folder = check_model_folder(path, error=EngineError)
        torch_dtype = _check_dtype(dtype, _check_device(device))
        try:
            pipe = FluxPipeline.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
        except Exception as exc:
            raise EngineError(
                f"could not load the FLUX pipeline from {str(folder)!r}:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        transformer, vae = pipe.transformer.config, pipe.vae.config
        if transformer.in_channels != 4 * vae.latent_channels:
            raise EngineError(
                f"{str(folder)!r}: the transformer takes {transformer.in_channels} input channels,"
                f" a plain FLUX text-to-image model takes {4 * vae.latent_channels}"
                " (a Fill/Depth/Canny variant is not supported)"
            )
        pipe.to(device)
        # from_pipe casts the (shared!) modules to its dtype argument, fp32 by default;
        # that cast logs a misleading "should be kept in float32" warning per module.
        with _quiet_diffusers():
            pipes: dict[Mode, Any] = {
                "text-to-image": pipe,
                "image-to-image": FluxImg2ImgPipeline.from_pipe(pipe, dtype=torch_dtype),
                "inpainting": FluxInpaintPipeline.from_pipe(pipe, dtype=torch_dtype),
            }
        for each in pipes.values():
            each.set_progress_bar_config(disable=True)
        # After from_pipe: every option below changes the shared modules in place.
        applied = apply_speed_options(pipe, options, device=device)
        return cls(pipes, path=folder, device=device, dtype=dtype, applied=applied)

    def pipeline_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the pipeline generates at: each side rounded to the nearest
        multiple of ``size_multiple`` (16 for FLUX; halves round up). ``run``
        resizes the result back to the requested size when the two differ."""
        m = self.size_multiple
        return max(m, (width + m // 2) // m * m), max(m, (height + m // 2) // m * m)

    def run(
        self,
        jobs: list[JobSpec],
        *,
        on_step: Callable[[int, int], bool] | None = None,
    ) -> list[list[Image.Image]]:
        """Generate every image of ``jobs`` in ONE pipeline call; images per job, in order.

        All jobs must have the same :meth:`JobSpec.batch_key`. ``on_step(step,
        total)`` is called after each denoising step (``step`` counts from 1;
        ``total`` is the number of steps actually run, fewer than ``steps``
        for image-to-image and inpainting); returning ``False`` stops the
        generation before the next step and raises :class:`Canceled`.
        """
        if not jobs:
            return []
        check_batch(jobs)
        first = jobs[0]
        width, height = self.pipeline_size(first.width, first.height)
        kwargs: dict[str, Any] = {
            "prompt": [job.prompt for job in jobs for _ in range(job.num_images)],
            "generator": [
                torch.Generator("cpu").manual_seed((job.seed + i) & _SEED_MASK)
                for job in jobs
                for i in range(job.num_images)
            ],
            "width": width,
            "height": height,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "num_images_per_prompt": 1,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "output_type": "pil",
            "callback_on_step_end": _step_callback(on_step),
        }
        if first.mode != "text-to-image":
            kwargs["strength"] = first.strength
            kwargs["image"] = _per_image(
                jobs, lambda job: resize_for(_rgb(_need(job.image)), width, height)
            )
        if first.mode == "inpainting":
            kwargs["mask_image"] = _per_image(
                jobs, lambda job: prepare_mask(_need(job.mask), (width, height))
            )
        with self._lock:
            images: list[Image.Image] = list(self._pipes[first.mode](**kwargs).images)
        results: list[list[Image.Image]] = []
        for job in jobs:
            mine, images = images[: job.num_images], images[job.num_images :]
            results.append([resize_for(image, job.width, job.height) for image in mine])
        return results

    def warmup(self, *, width: int = 256, height: int = 256, steps: int = 2) -> None:
        """One small text-to-image generation: loads kernels, triggers torch.compile."""
        job = JobSpec(
            prompt="warm-up",
            mode="text-to-image",
            width=width,
            height=height,
            steps=steps,
            guidance=3.5,
            num_images=1,
            seed=0,
            output_format="png",
        )
        self.run([job])

    def device_info(self) -> dict[str, object]:
        """What runs where: for logs, health and the worker's ``/info``."""
        import diffusers

        info: dict[str, object] = {
            "model_path": str(self._path),
            "device": self._device,
            "dtype": self._dtype,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "size_multiple": self.size_multiple,
            "options": dict(self._applied),
        }
        if self._device.startswith("cuda"):
            index = torch.device(self._device).index or 0
            props = torch.cuda.get_device_properties(index)
            info["cuda_name"] = props.name
            info["cuda_capability"] = f"{props.major}.{props.minor}"
            info["cuda_memory_total_bytes"] = int(props.total_memory)
            info["cuda_memory_allocated_bytes"] = int(torch.cuda.memory_allocated(index))
        return info


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        diffusers_logger.setLevel(level)


def _need(image: Image.Image | None) -> Image.Image:
    if image is None:  # pragma: no cover - JobSpec.check ran first
        raise ValueError("missing input image")
    return image


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else to_rgb(image)


def _per_image(jobs: list[JobSpec], prepare: Callable[[JobSpec], Image.Image]) -> list[Image.Image]:
    """``prepare(job)`` once per job, repeated for each of its images."""
    out: list[Image.Image] = []
    for job in jobs:
        out.extend([prepare(job)] * job.num_images)
    return out


def _step_callback(
    on_step: Callable[[int, int], bool] | None,
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]] | None:
    """diffusers' ``callback_on_step_end`` around ``on_step``.

    Cancel raises from inside the callback: the pipeline's own
    ``_interrupt`` flag only skips the remaining steps and then still decodes
    the latents with the VAE, wasted work for an abandoned job.
    """
    if on_step is None:
        return None

    def callback(pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        total = int(pipe.num_timesteps)
        if on_step(index + 1, total) is False:
            raise Canceled(index + 1, total)
        return tensors

    return callback


def _check_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise EngineError(f"unknown device {device!r}; use cuda, cuda:N or cpu") from exc
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise EngineError(f"unsupported device {device!r}; use cuda, cuda:N or cpu")
    if not torch.cuda.is_available():
        raise EngineError(
            f"device {device!r} requested but CUDA is not available"
            f" (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"
        )
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise EngineError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def _check_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise EngineError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if device.type == "cpu" and dtype == "fp16":
        raise EngineError("fp16 is not supported on CPU; use bf16 or fp32")
    if device.type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise EngineError(f"this GPU does not support bf16; use fp16 or fp32 on {device}")
    return DTYPES[dtype]
