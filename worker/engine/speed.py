"""Optional speed-ups for a loaded FLUX pipeline, each applied only where it helps.

Every option changes the pipeline's modules *in place*, so img2img and
inpaint pipelines made with ``from_pipe`` (which share those modules) get
them too. ``apply_speed_options`` reports, per option, ``"on"``, ``"off"``
(not requested) or ``"skipped: <why>"``; the engine shows that in
``device_info()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedOptions:
    """Speed options, all off by default (and skipped on CPU, where they don't pay).

    * ``compile``: ``torch.compile`` of the transformer's repeated blocks
      (regional compilation: compiles in seconds, not minutes, and survives
      size changes better). CUDA only; the first generation at each new
      shape is slow, which is what the warm-up is for.
    * ``channels_last``: the VAE's convolutions in channels-last memory
      format (faster cuDNN kernels). CUDA only.
    * ``tf32``: TF32 for fp32 matmuls/convolutions (Ampere or newer).
      Process-wide switch; CUDA only; no effect on bf16/fp16 weights.
    * ``fuse_qkv``: one fused Q/K/V projection per attention layer instead of
      three matmuls. Any device, but diffusers keeps the unfused weights
      too, so attention weights take more memory.
    * ``fp8``: transformer linear layers quantised to fp8 (dynamic
      activation + weight) with ``torchao``, when installed. CUDA compute
      capability 8.9+ (Ada, Hopper); roughly halves transformer memory.
    """

    compile: bool = False
    channels_last: bool = False
    tf32: bool = False
    fuse_qkv: bool = False
    fp8: bool = False


def apply_speed_options(pipe: Any, options: SpeedOptions, *, device: str) -> dict[str, str]:
    """Apply ``options`` to ``pipe`` (already on ``device``); what happened, per option."""
    on_cuda = torch.device(device).type == "cuda"
    applied = {f.name: "off" for f in fields(options)}
    # Order matters: fuse before quantising, quantise before compiling.
    steps = (
        ("fuse_qkv", lambda: _fuse_qkv(pipe)),
        ("fp8", lambda: _fp8(pipe, device) if on_cuda else "skipped: needs CUDA"),
        ("channels_last", lambda: _channels_last(pipe) if on_cuda else "skipped: needs CUDA"),
        ("tf32", lambda: _tf32() if on_cuda else "skipped: needs CUDA"),
        ("compile", lambda: _compile(pipe) if on_cuda else "skipped: needs CUDA"),
    )
    for name, apply in steps:
        if not getattr(options, name):
            continue
        try:
            applied[name] = apply()
        except Exception as exc:  # a speed-up must never stop the worker from starting
            logger.warning("speed option %s failed: %s: %s", name, type(exc).__name__, exc)
            applied[name] = f"skipped: {type(exc).__name__}: {exc}"
    return applied


def _fuse_qkv(pipe: Any) -> str:
    pipe.transformer.fuse_qkv_projections()
    return "on"


def _fp8(pipe: Any, device: str) -> str:
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < (8, 9):
        return f"skipped: fp8 needs compute capability 8.9+, this GPU has {major}.{minor}"
    try:
        from torchao.quantization import quantize_
    except ImportError:
        return "skipped: torchao is not installed"
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        config: Any = Float8DynamicActivationFloat8WeightConfig()
    except ImportError:  # older torchao
        from torchao.quantization import float8_dynamic_activation_float8_weight

        config = float8_dynamic_activation_float8_weight()
    quantize_(pipe.transformer, config)
    return "on"


def _channels_last(pipe: Any) -> str:
    pipe.vae.to(memory_format=torch.channels_last)
    return "on"


def _tf32() -> str:
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return "on"


def _compile(pipe: Any) -> str:
    transformer = pipe.transformer
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=True)
        return "on (repeated blocks)"
    transformer.compile(fullgraph=True)
    return "on"
