"""NSFW checks on generated images: one flag per image, and what to do with flagged ones.

Checkers (all implement :class:`SafetyChecker`):

* ``ViTChecker`` (default; a torch model, so in ``worker.engine.vit``): a
  transformers image classifier read from a local folder in the layout of
  ``Falconsai/nsfw_image_detection`` (a ViT with labels ``normal`` / ``nsfw``).
  Black Forest Labs' reference code uses that model and flags an image when
  its ``nsfw`` score is >= 0.85; so do we.
* :class:`NudeNetChecker` (optional): NudeNet's exposed-body-part detector.
  Its licence is AGPL-3.0, so it is only an optional extra
  (``pip install flux-proxy[nudenet]``) and imported lazily.
* :class:`NoChecker`: flags nothing.

The checker runs only when a request has ``enable_safety_checker``; the
policy then either only reports the flags (``"flag"``, the default) or also
replaces flagged images with black ones (``"blackout"``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image

CheckerKind = Literal["vit", "nudenet", "none"]
Policy = Literal["flag", "blackout"]

VIT_THRESHOLD = 0.85  # Black Forest Labs' reference (flux/cli.py: NSFW_THRESHOLD)
NSFW_LABEL = "nsfw"
NUDENET_THRESHOLD = 0.5
# NudeNet detector classes that count as nudity (covered parts, faces, feet, ... do not).
NUDENET_CLASSES = frozenset(
    {
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)


class SafetyCheckerError(Exception):
    """A checker cannot be built (missing model folder, package not installed)."""


class SafetyChecker(Protocol):
    def check(self, images: list[Image.Image]) -> list[bool]:
        """One flag per image, in order: ``True`` = probably NSFW."""
        ...


class NoChecker:
    """Flags nothing (``safety_checker = "none"``)."""

    def check(self, images: list[Image.Image]) -> list[bool]:
        return [False] * len(images)


class NudeNetChecker:
    """NudeNet's detector: flags an image with an exposed-nudity detection >= ``threshold``.

    Licence: the ``nudenet`` package is AGPL-3.0; it is an optional extra,
    never a dependency. It ships its ONNX model inside the wheel (no download).
    """

    def __init__(self, detector: Any, *, threshold: float = NUDENET_THRESHOLD) -> None:
        self._detector = detector
        self.threshold = threshold

    @classmethod
    def load(cls, threshold: float = NUDENET_THRESHOLD) -> NudeNetChecker:
        try:
            from nudenet import NudeDetector
        except ImportError as exc:
            raise SafetyCheckerError(
                "safety_checker=nudenet needs the optional nudenet package (AGPL-3.0):"
                " pip install 'flux-proxy[nudenet]'"
            ) from exc
        return cls(NudeDetector(), threshold=threshold)

    def check(self, images: list[Image.Image]) -> list[bool]:
        flags: list[bool] = []
        with tempfile.TemporaryDirectory(prefix="nudenet-") as tmp:
            for n, image in enumerate(images):
                # Every NudeNet 3.x version accepts a file path (not all take arrays).
                file = Path(tmp) / f"{n}.png"
                image.convert("RGB").save(file, format="PNG")
                detections = self._detector.detect(str(file))
                flags.append(_nudity(detections, self.threshold))
        return flags


def _nudity(detections: Sequence[dict[str, Any]], threshold: float) -> bool:
    return any(
        d.get("class") in NUDENET_CLASSES and float(d.get("score", 0.0)) >= threshold
        for d in detections
    )


def build_checker(
    kind: CheckerKind, path: str | Path | None, *, device: str = "cpu",
    threshold: float = VIT_THRESHOLD,
) -> SafetyChecker:
    """The configured checker; :class:`SafetyCheckerError` if it cannot be built."""
    if kind == "none":
        return NoChecker()
    if kind == "nudenet":
        return NudeNetChecker.load()
    if kind == "vit":
        if path is None:
            raise SafetyCheckerError(
                "safety_checker=vit needs the path of a local NSFW classifier folder"
                " (e.g. a download of Falconsai/nsfw_image_detection)"
            )
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise SafetyCheckerError(
                f"NSFW classifier folder {str(folder)!r} has no config.json; expected a local copy"
                " of Falconsai/nsfw_image_detection (config.json, model.safetensors,"
                " preprocessor_config.json)"
            )
        try:  # a torch model: the worker's `local` extra
            from .engine.vit import ViTChecker
        except ImportError as exc:
            raise SafetyCheckerError(
                "safety_checker=vit needs transformers and torch:"
                f" pip install 'flux-proxy[local]' ({exc})"
            ) from exc
        return ViTChecker.load(folder, threshold, device=device)
    raise SafetyCheckerError(f"unknown safety checker {kind!r}; use vit, nudenet or none")


def apply_policy(images: list[Image.Image], flags: list[bool], policy: Policy) -> list[Image.Image]:
    """``images`` with the flagged ones replaced by black images of the same size
    under ``"blackout"``; unchanged under ``"flag"``."""
    if len(images) != len(flags):
        raise ValueError(f"{len(images)} images but {len(flags)} flags")
    if policy == "flag":
        return list(images)
    if policy != "blackout":
        raise ValueError(f"unknown NSFW policy {policy!r}; use flag or blackout")
    return [
        Image.new("RGB", image.size, (0, 0, 0)) if flagged else image
        for image, flagged in zip(images, flags, strict=True)
    ]
