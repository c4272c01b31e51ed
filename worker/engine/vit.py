"""The default NSFW checker: a ViT image classifier (torch), from a local folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from ..safety import NSFW_LABEL, VIT_THRESHOLD, SafetyCheckerError


class ViTChecker:
    """An image classifier with an ``nsfw`` label, from a local folder; never downloads."""

    def __init__(
        self, model: Any, processor: Any, *, nsfw_index: int, threshold: float, device: str
    ) -> None:
        self._model = model
        self._processor = processor
        self._nsfw_index = nsfw_index
        self.threshold = threshold
        self._device = device

    @classmethod
    def load(
        cls, path: str | Path, threshold: float = VIT_THRESHOLD, *, device: str = "cpu"
    ) -> ViTChecker:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise SafetyCheckerError(
                f"NSFW classifier folder {str(folder)!r} has no config.json; expected a local copy"
                " of Falconsai/nsfw_image_detection (config.json, model.safetensors,"
                " preprocessor_config.json)"
            )
        try:  # the ViT checker is a torch model: the worker's `local` extra
            from transformers import AutoImageProcessor, AutoModelForImageClassification
        except ImportError as exc:
            raise SafetyCheckerError(
                "safety_checker=vit needs transformers and torch:"
                f" pip install 'flux-proxy[local]' ({exc})"
            ) from exc
        try:
            model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise SafetyCheckerError(
                f"could not load the NSFW classifier from {str(folder)!r}:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        labels = {int(i): str(name).lower() for i, name in model.config.id2label.items()}
        matches = [i for i, name in labels.items() if name == NSFW_LABEL]
        if not matches:
            raise SafetyCheckerError(
                f"NSFW classifier {str(folder)!r} has no {NSFW_LABEL!r} label"
                f" (labels: {sorted(labels.values())})"
            )
        model.to(device).eval()
        return cls(model, processor, nsfw_index=matches[0], threshold=threshold, device=device)

    def scores(self, images: list[Image.Image]) -> list[float]:
        """The ``nsfw`` probability of each image."""
        import torch

        if not images:
            return []
        rgb = [image.convert("RGB") for image in images]
        inputs = self._processor(images=rgb, return_tensors="pt").to(self._device)
        with torch.inference_mode():
            logits = self._model(**inputs).logits
        probabilities = logits.float().softmax(dim=-1)[:, self._nsfw_index]
        return [float(p) for p in probabilities.cpu()]

    def check(self, images: list[Image.Image]) -> list[bool]:
        return [score >= self.threshold for score in self.scores(images)]
