"""Check a local model folder before diffusers sees it, for readable start-up errors.

diffusers' own failures for a wrong folder are long tracebacks about missing
files or hub lookups; these checks name the problem and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

FLUX_PIPELINES = frozenset({"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"})
REQUIRED_COMPONENTS = (
    "scheduler",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "transformer",
)
HINT = (
    "expected a diffusers model folder such as a download of black-forest-labs/FLUX.1-dev"
    " (model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,"
    " tokenizer_2/, scheduler/)"
)


def check_model_folder(path: str | Path, *, error: type[Exception]) -> Path:
    """``path`` resolved, if it looks like a FLUX text-to-image pipeline; else raise ``error``."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise error(f"model folder {str(folder)!r} does not exist; {HINT}")
    if not folder.is_dir():
        raise error(f"model path {str(folder)!r} is not a folder; {HINT}")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise error(
            f"{str(folder)!r} has no model_index.json, so it is not a diffusers pipeline; {HINT}"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{str(index_file)!r} is not readable JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise error(f"{str(index_file)!r} is not a JSON object")
    class_name = index.get("_class_name")
    if class_name not in FLUX_PIPELINES:
        raise error(
            f"{str(folder)!r} holds a {class_name or 'pipeline without _class_name'},"
            f" not a FLUX text-to-image pipeline (FluxPipeline); {HINT}"
        )
    for name in REQUIRED_COMPONENTS:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise error(f"{str(folder)!r}: model_index.json lists no {name!r} component; {HINT}")
        if not (folder / name).is_dir():
            raise error(f"{str(folder)!r}: the {name}/ sub-folder is missing; {HINT}")
    return folder.resolve()
