"""The only part of the worker that imports torch and diffusers.

``FluxEngine`` (``flux``) runs the three FLUX pipelines on one loaded model;
``SpeedOptions`` / ``apply_speed_options`` (``speed``) are its optional
speed-ups; ``tiny`` writes tiny random models for tests and demos. The engine
seam's torch-free types (``JobSpec``, ``Mode``, ``EngineError``, ``Canceled``)
live in :mod:`worker.spec` and are re-exported here for convenience; code
outside this package imports them from ``worker.spec``.
"""

from ..spec import Canceled, EngineError, JobSpec, Mode
from .flux import DTYPES, FluxEngine
from .speed import SpeedOptions, apply_speed_options

__all__ = [
    "DTYPES",
    "Canceled",
    "EngineError",
    "FluxEngine",
    "JobSpec",
    "Mode",
    "SpeedOptions",
    "apply_speed_options",
]
