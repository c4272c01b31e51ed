"""Worker settings: environment variables `FLUX_WORKER_<NAME>` (and CLI options).

Precedence, highest first: init arguments (the CLI, tests), environment, defaults.
`startup_problems()` lists what would stop the worker from starting, in words an
operator can act on; `serve()` and the app's lifespan refuse to start on any.
"""

from __future__ import annotations

import math
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .model_folder import check_model_folder

Device = Literal["auto", "cuda", "cpu"]
Dtype = Literal["auto", "bf16", "fp16", "fp32"]
SpeedFlag = bool | Literal["auto"]

NSFW_MODEL_HINT = (
    "download the classifier (e.g. `huggingface-cli download Falconsai/nsfw_image_detection "
    "--local-dir ./models/nsfw`) and set FLUX_WORKER_SAFETY_MODEL_PATH to that folder, "
    "or set FLUX_WORKER_SAFETY_CHECKER=none to run without an NSFW check"
)


ML_EXTRA = ("torch", "diffusers", "transformers")  # what the engine imports
ML_EXTRA_HINT = "pip install 'flux-proxy[local]'"


def missing_ml_packages() -> list[str]:
    """The engine's packages that are not installed (found, not imported: no torch here)."""
    return [name for name in ML_EXTRA if find_spec(name) is None]


class WorkerConfigError(Exception):
    """The worker cannot start with these settings; the message says what to change."""


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLUX_WORKER_", extra="forbid", validate_default=True
    )

    # --- the model
    model_path: Path | None = None  # a diffusers FLUX folder (model_index.json)
    device: Device = "auto"  # auto: cuda when torch sees a GPU, else cpu
    dtype: Dtype = "auto"  # auto: bf16 on cuda, fp32 on cpu
    # Speed options; "auto" switches on what the device supports (see speed_options()).
    compile: SpeedFlag = False
    channels_last: SpeedFlag = False
    tf32: SpeedFlag = False
    fuse_qkv: SpeedFlag = False
    fp8: SpeedFlag = False
    warmup: bool = True  # one tiny generation at start-up, before serving

    # --- HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    token: SecretStr | None = None  # FLUX_WORKER_TOKEN: bearer token on every route but
    # /health and /metrics
    public_base_url: str = ""  # base of output URLs; empty: from the request
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"

    # --- the queue
    max_batch_size: int = Field(default=4, ge=1, le=64)  # images per pipeline call
    batch_window_ms: float = Field(default=20.0, ge=0, le=10_000)
    max_queue: int = Field(default=64, ge=1)  # queued (not running) jobs; over it: 503
    job_ttl_s: float = Field(default=3600.0, gt=0)  # finished jobs kept this long
    max_finished_jobs: int = Field(default=1024, ge=1)  # and at most this many

    # --- safety
    safety_checker: Literal["vit", "nudenet", "none"] = "vit"
    safety_model_path: Path | None = None  # the ViT classifier folder (safety_checker=vit)
    nsfw_policy: Literal["flag", "blackout"] = "flag"  # blackout: flagged images -> black
    nsfw_threshold: float = Field(default=0.85, ge=0.0, le=1.0)

    # --- input images
    allow_private_urls: bool = False  # the SSRF guard; true only on-prem / in tests
    max_input_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    fetch_timeout_s: float = Field(default=15.0, gt=0)

    @property
    def batch_window_s(self) -> float:
        return self.batch_window_ms / 1000.0

    @property
    def max_body_bytes(self) -> int:
        """Two base64 inputs (image, mask) of max_input_bytes each, plus the rest."""
        return 2 * math.ceil(self.max_input_bytes * 4 / 3) + 1024 * 1024

    def startup_problems(self, *, need_model: bool = True, need_checker: bool = True) -> list[str]:
        """What stops the worker from starting (empty: nothing)."""
        problems: list[str] = []
        if need_model:
            if self.model_path is None:
                problems.append("no model: pass --model PATH (or set FLUX_WORKER_MODEL_PATH) "
                                "to a diffusers FLUX.1 [dev] folder")
            else:
                try:
                    check_model_folder(self.model_path, error=WorkerConfigError)
                except WorkerConfigError as exc:
                    problems.append(str(exc))
            missing = missing_ml_packages()
            if missing:
                problems.append(f"the engine needs {', '.join(missing)} (the worker's ML extra): "
                                + ML_EXTRA_HINT)
        if need_checker and self.safety_checker == "vit":
            if self.safety_model_path is None:
                problems.append("safety_checker=vit needs a model: " + NSFW_MODEL_HINT)
            elif not self.safety_model_path.is_dir():
                problems.append(f"safety model path {str(self.safety_model_path)!r} is not a "
                                "folder: " + NSFW_MODEL_HINT)
        return problems

    def check(self, *, need_model: bool = True, need_checker: bool = True) -> None:
        problems = self.startup_problems(need_model=need_model, need_checker=need_checker)
        if problems:
            raise WorkerConfigError("; ".join(problems))
