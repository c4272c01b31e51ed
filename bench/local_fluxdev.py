"""The full-size FLUX.1-dev architecture with random weights, built directly on a GPU.

For ``local_worker.py --random-full``: the 12B transformer, T5-XXL, CLIP-L and the
16-channel VAE in bf16/fp16, nothing saved and nothing downloaded (the tokenizers are
built in code as in ``worker.engine.tiny``), wrapped in a ``FluxEngine`` the way
``FluxEngine.load`` does it. CUDA only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class SetupError(Exception):
    """The benchmark cannot run with these arguments or on this machine; says why."""


# black-forest-labs/FLUX.1-dev, each component's config.json (the parts that shape it).
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_DEV_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
CLIP_L: dict[str, Any] = {  # openai/clip-vit-large-patch14, text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
T5_XXL: dict[str, Any] = {  # google/t5-v1_1-xxl, encoder only
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
FULL_PARAMS = 16.87e9  # the four above, counted on the meta device
FULL_MIN_FREE_GIB = 40.0  # bf16 weights (~31.4 GiB) plus activations at 1024x1024, batch 4


@contextlib.contextmanager
def _default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_random_full_engine(
    device: str,
    dtype: str,
    options: Any,
    *,
    configs: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """A FluxEngine on the FLUX.1-dev architecture with random weights, built on ``device``.

    Every parameter is allocated on ``device`` in ``dtype`` (torch's device context and
    default dtype), so nothing passes through host memory. ``configs`` replaces the
    components' configs (keys transformer, vae, clip, t5), for a scaled-down check of
    this code on a CPU; the benchmark itself always uses the full ones. The pipelines
    are wrapped the way ``FluxEngine.load`` does it (img2img and inpaint via
    ``from_pipe``, progress bars off, then the speed options on the shared modules).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxImg2ImgPipeline,
        FluxInpaintPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from worker.engine import DTYPES, FluxEngine, Mode, apply_speed_options
    from worker.engine.tiny import _SCHEDULER_CONFIG, _clip_tokenizer, _t5_tokenizer

    cfg = {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_DEV_VAE, "clip": CLIP_L,
           "t5": T5_XXL} | (configs or {})
    torch_dtype = DTYPES[dtype]
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    clip_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(torch_dtype):
        transformer = FluxTransformer2DModel(**cfg["transformer"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["clip"], **clip_ids))
        text_encoder_2 = T5EncoderModel(T5Config(**cfg["t5"], pad_token_id=0, eos_token_id=1))
    modules: list[Any] = [transformer, vae, text_encoder, text_encoder_2]
    for module in modules:
        module.eval()
        module.requires_grad_(False)
    pipe: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.to(device)  # already there; as in FluxEngine.load
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # from_pipe's misleading dtype warnings
    try:
        pipes: dict[Mode, Any] = {
            "text-to-image": pipe,
            "image-to-image": FluxImg2ImgPipeline.from_pipe(pipe, dtype=torch_dtype),
            "inpainting": FluxInpaintPipeline.from_pipe(pipe, dtype=torch_dtype),
        }
    finally:
        diffusers_logger.setLevel(level)
    for each in pipes.values():
        each.set_progress_bar_config(disable=True)
    applied = apply_speed_options(pipe, options, device=device)
    return FluxEngine(pipes, path=Path("random-init:FLUX.1-dev"), device=device, dtype=dtype,
                      applied=applied)


def check_random_full(device: str, dtype: str) -> None:
    """Refuse --random-full where it cannot work, before allocating anything."""
    import torch

    if not device.startswith("cuda"):
        raise SetupError("--random-full needs --device cuda: the full FLUX.1-dev architecture "
                         "has ~17B parameters (a CPU would take hours per image, and fp32 "
                         "would need ~67 GB of RAM)")
    if dtype not in ("bf16", "fp16"):
        raise SetupError(f"--random-full runs in bf16 or fp16, not {dtype} (~67 GB of fp32 "
                         "weights); use --dtype bf16")
    free, total = torch.cuda.mem_get_info(torch.device(device))
    gib = 1024**3
    if free / gib < FULL_MIN_FREE_GIB:
        raise SetupError(f"--random-full needs about {FULL_MIN_FREE_GIB:.0f} GiB of free GPU "
                         f"memory ({FULL_PARAMS * 2 / gib:.1f} GiB of {dtype} weights plus "
                         f"activations); this GPU has {free / gib:.1f} of {total / gib:.1f} "
                         "GiB free")
