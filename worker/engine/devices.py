"""What torch sees: a CUDA GPU or not, and its compute capability.

The loader's "auto" choices (device, dtype, speed options) ask here, so that
the torch import stays inside ``worker.engine``.
"""

from __future__ import annotations

import torch


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def cuda_capability() -> tuple[int, int]:
    """``(major, minor)`` of the current CUDA device."""
    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def torch_version() -> str:
    return str(torch.__version__)
