"""Settings carried inside result PNGs (studio and `core.sample`), so an image tells how to
make it again.

A result PNG holds one tEXt chunk, keyword `landscape-studio`, whose text is JSON: the request
(mode, size, seed, sampling options), the model name, the sample index and the pipeline's own
settings. Uploading such a PNG restores the request into the studio's controls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

__all__ = [
    "KEYWORD",
    "REQUEST_FIELDS",
    "MetadataError",
    "read_metadata",
    "request_settings",
    "save_png",
]

KEYWORD = "landscape-studio"
# 2: free mode with a scene class is guided (format 1 recorded a guidance it did not use there)
FORMAT_VERSION = 2

# Fields of core.pipeline.GenerateRequest that the controls show (the condition travels as its
# own PNG beside the result).
REQUEST_FIELDS = (
    "mode",
    "width",
    "height",
    "scene",
    "superres_factor",
    "seed",
    "temperature",
    "top_k",
    "top_p",
    "guidance",
    "prior",
    "window",
    "num_samples",
    "compose",
)


class MetadataError(ValueError):
    """A PNG does not carry the studio's settings (or they cannot be read)."""


def _plain(value: Any) -> Any:
    """JSON-ready copy of settings that may hold numpy scalars, tuples or paths."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return f"<array {'x'.join(map(str, value.shape))} {value.dtype}>"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def request_settings(request: Any) -> dict[str, Any]:
    """The reproducible fields of a GenerateRequest (no condition array) as a plain dict."""
    return {field: _plain(getattr(request, field)) for field in REQUEST_FIELDS}


def save_png(
    image: np.ndarray, path: str | Path, request: dict[str, Any], model: str, **extra: Any
) -> Path:
    """Write an H×W×3 uint8 image as PNG with the settings as JSON in a tEXt chunk."""
    document = {"format": FORMAT_VERSION, "model": model, "request": _plain(request)}
    document.update(_plain(extra))
    info = PngImagePlugin.PngInfo()
    # ASCII-only JSON, so PIL writes a plain tEXt chunk rather than iTXt.
    info.add_text(KEYWORD, json.dumps(document, ensure_ascii=True, sort_keys=True))
    path = Path(path)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG", pnginfo=info)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The settings document of a studio PNG; MetadataError when there is none."""
    name = Path(path).name
    try:
        with Image.open(path) as image:
            image.load()
            text = image.text.get(KEYWORD) if hasattr(image, "text") else None
    except (OSError, UnidentifiedImageError, ValueError):
        raise MetadataError(
            f"{name} is not an image; upload a PNG saved by the studio to restore its settings."
        ) from None
    if text is None:
        raise MetadataError(
            f"{name} carries no studio settings (no '{KEYWORD}' text chunk); upload a PNG "
            "downloaded from the studio's results."
        )
    try:
        document = json.loads(text)
        request = document["request"]
        missing = [field for field in ("mode", "width", "height", "seed") if field not in request]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MetadataError(
            f"{name}: the studio settings in it are damaged (not valid JSON)."
        ) from None
    if missing:
        raise MetadataError(f"{name}: the studio settings lack {', '.join(missing)}.")
    return document
