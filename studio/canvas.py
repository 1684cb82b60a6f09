"""What the studio's canvases hold, turned into the conditions the pipeline takes.

The ImageEditor gives a dict of RGBA arrays (background, layers, composite). Here the layout
canvas becomes palette ids (unpainted = free), a sketch becomes grey paper with strokes, a grey
depth painting becomes [0, 1] depth and a mask painted over a result becomes a boolean mask.
Everything is numpy and PIL; nothing here knows about Gradio or the models.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.conditions import ConditionError, load_depth
from core.palette import LayoutError, Palette, check_layout, ids_to_rgb, load_label_map, rgb_to_ids

__all__ = [
    "PRESETS",
    "CanvasError",
    "blank_canvas",
    "brush_colours",
    "check_size",
    "depth_canvas",
    "depth_from_canvas",
    "edited_layout",
    "grey_canvas",
    "layout_canvas",
    "layout_from_canvas",
    "legend_html",
    "mask_from_canvas",
    "preset_name",
    "read_depth_upload",
    "read_layout_upload",
    "resize_depth",
    "resize_ids",
    "resize_rgb",
    "scaled_canvases",
    "sketch_from_canvas",
    "unreadable_upload",
]

# Canvas sizes offered next to the size fields (width, height in pixels).
PRESETS: dict[str, tuple[int, int]] = {
    "512 × 512": (512, 512),
    "1024 × 576": (1024, 576),
    "1280 × 832": (1280, 832),
    "1024 × 1024": (1024, 1024),
}
MIN_SIDE = 16  # one token
CUSTOM = "custom"  # the size menu's entry when the fields hold no preset


def preset_name(width: float | None, height: float | None) -> str:
    """The size menu's entry for the size in the fields: its preset, else "custom"."""
    for name, size in PRESETS.items():
        if (width, height) == size:
            return name
    return CUSTOM


SKETCH_EMPTY = (
    "The sketch is empty: draw some dark strokes on the white paper (start each stroke on the "
    "paper), or use Upload a drawing…"
)
FREE_LEGEND = "free — unpainted, the model decides"

EditorValue = dict | None


class CanvasError(ValueError):
    """A canvas, an upload or a size the user gave cannot be used; the message says why."""


def check_size(width: float | None, height: float | None, max_side: int) -> tuple[int, int]:
    """Validate an output size typed by the user; return it as ints."""
    if width is None or height is None:
        raise CanvasError("Give the image a width and a height in pixels.")
    width, height = int(width), int(height)
    if not (MIN_SIDE <= width <= max_side and MIN_SIDE <= height <= max_side):
        raise CanvasError(
            f"{width} × {height} is outside the limit: each side must be between {MIN_SIDE} and "
            f"{max_side} pixels."
        )
    return width, height


def hex_colour(rgb: tuple[int, int, int]) -> str:
    """'#rrggbb' for an RGB triple."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def brush_colours(palette: Palette) -> list[str]:
    """Swatches of the layout brush: every class colour, then the free colour."""
    return [hex_colour(colour) for colour in palette.colours] + [hex_colour(palette.free_colour)]


def legend_html(palette: Palette) -> str:
    """A small table of swatch + class name, free last, shown beside the layout canvas."""
    entries = list(zip(palette.colours, palette.names, strict=True))
    entries.append((palette.free_colour, FREE_LEGEND))
    rows = "".join(
        f'<tr><td><span class="swatch" style="background:{hex_colour(colour)}"></span></td>'
        f"<td>{html.escape(name)}</td></tr>"
        for colour, name in entries
    )
    caption = (
        "<caption>Key: pick the class to paint with the palette button in the editor's "
        "toolbar (below the eraser)</caption>"
    )
    return f'<table class="legend">{caption}{rows}</table>'


# --- building canvases ---------------------------------------------------------------------


def blank_canvas(width: int, height: int) -> dict:
    """An empty layout canvas: fully transparent, so everything on it is free."""
    paper = np.zeros((height, width, 4), dtype=np.uint8)
    return {"background": paper, "layers": [], "composite": paper}


def grey_canvas(width: int, height: int, grey: int) -> dict:
    """A plain opaque canvas (white paper for sketches, black = far for depth)."""
    paper = np.full((height, width, 3), grey, dtype=np.uint8)
    return {"background": paper, "layers": [], "composite": paper}


def layout_canvas(ids: np.ndarray, palette: Palette) -> dict:
    """A layout shown on the canvas: classes in their colours, free pixels transparent."""
    rgba = np.zeros((*ids.shape, 4), dtype=np.uint8)
    rgba[..., :3] = ids_to_rgb(ids, palette)
    rgba[..., 3] = np.where(ids == palette.free_id, 0, 255)
    return {"background": rgba, "layers": [], "composite": rgba}


def grey_picture_canvas(grey: np.ndarray) -> dict:
    """An H×W uint8 grey picture (a drawing, a depth map) as an opaque canvas."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    return {"background": rgb, "layers": [], "composite": rgb}


def depth_canvas(depth: np.ndarray) -> dict:
    """A [0, 1] depth map (near = bright) as a grey canvas."""
    return grey_picture_canvas(np.round(np.clip(depth, 0.0, 1.0) * 255.0).astype(np.uint8))


# --- reading canvases ----------------------------------------------------------------------


def _composite(value: EditorValue) -> np.ndarray | None:
    if not isinstance(value, dict):
        return None
    composite = value.get("composite")
    if composite is None:
        composite = value.get("background")
    return None if composite is None else np.asarray(composite)


def _as_rgba(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 3:
        alpha = np.full((*pixels.shape[:2], 1), 255, dtype=np.uint8)
        pixels = np.concatenate([pixels, alpha], axis=2)
    return pixels.astype(np.uint8)


def layout_from_canvas(value: EditorValue, palette: Palette) -> np.ndarray:
    """Palette ids (H×W) of the painted layout canvas; transparent pixels are free.

    Anti-aliased stroke edges snap to the nearest class (core.palette.rgb_to_ids). Raises
    CanvasError when nothing is painted and LayoutError when no known class is used.
    """
    pixels = _composite(value)
    if pixels is None or pixels.size == 0:
        raise CanvasError("The layout canvas is empty: paint a few classes (sky, trees, …) first.")
    ids = rgb_to_ids(_as_rgba(pixels), palette)
    if (ids == palette.free_id).all():
        raise CanvasError("The layout canvas is empty: paint a few classes (sky, trees, …) first.")
    check_layout(ids, palette)
    return ids


def edited_layout(value: EditorValue, palette: Palette) -> np.ndarray:
    """Palette ids of the canvas as it stands, empty or not (for previews and fills)."""
    pixels = _composite(value)
    if pixels is None or pixels.size == 0:
        raise CanvasError("The layout canvas is empty: start a new canvas first.")
    return rgb_to_ids(_as_rgba(pixels), palette)


def sketch_from_canvas(value: EditorValue) -> np.ndarray:
    """The sketch as RGB (H×W×3 uint8), transparent parts as white paper."""
    pixels = _composite(value)
    if pixels is None or pixels.size == 0:
        raise CanvasError(SKETCH_EMPTY)
    rgba = _as_rgba(pixels).astype(np.float32)
    alpha = rgba[..., 3:4] / 255.0
    rgb = np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    grey = rgb.mean(axis=2)
    if grey.max() - grey.min() < 24:
        raise CanvasError(SKETCH_EMPTY)
    return rgb


def depth_from_canvas(value: EditorValue) -> np.ndarray:
    """The grey depth painting as float32 H×W in [0, 1], near = bright."""
    pixels = _composite(value)
    if pixels is None or pixels.size == 0:
        raise CanvasError(
            "The depth canvas is empty: upload a depth map, paint one in grey (near = bright) "
            "or estimate one from the layout."
        )
    rgba = _as_rgba(pixels).astype(np.float32)
    alpha = rgba[..., 3] / 255.0
    grey = rgba[..., :3].mean(axis=2) * alpha  # transparent = black = far
    return (grey / 255.0).astype(np.float32)


def mask_from_canvas(value: EditorValue, shape: tuple[int, int]) -> np.ndarray:
    """Pixels painted over a result (any layer, any colour) as an H×W bool mask."""
    layers = value.get("layers") if isinstance(value, dict) else None
    mask = np.zeros(shape, dtype=bool)
    for layer in layers or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4:
            painted = layer[..., 3] > 0
        else:
            continue  # an opaque layer carries no painted/unpainted distinction
        if painted.shape != shape:
            painted = resize_ids(painted.astype(np.uint8), shape[1], shape[0]).astype(bool)
        mask |= painted
    if not mask.any():
        raise CanvasError("Paint over the part of the result you want redone, then resample.")
    return mask


# --- uploads -------------------------------------------------------------------------------


def _open_image(path: str | Path, what: str, name: str | None = None) -> Image.Image:
    """The image at path; else a CanvasError naming it (as `name`, by default the file's)."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, ValueError):
        raise CanvasError(
            f"{name or Path(path).name} is not an image I can read; {what} must be a PNG (or "
            "another image file)."
        ) from None
    return image


def unreadable_upload(payload: Any, what: str) -> str | None:
    """Why a file just dropped on an image component cannot be read (None if it can).

    payload is the component's raw value, a file record {"path": ..., "orig_name": ...} (not
    preprocessed: that would fail on a bad file).
    """
    path = payload.get("path") if isinstance(payload, dict) else None
    if not path:
        return None  # nothing uploaded (a cleared component)
    try:
        _open_image(path, what, payload.get("orig_name")).close()
    except CanvasError as error:
        return str(error)
    return None


def read_layout_upload(path: str | Path, palette: Palette) -> np.ndarray:
    """A label map (mode L/P ids) or an image painted in palette colours, as ids."""
    image = _open_image(path, "a layout")
    try:
        ids = load_label_map(image, palette)
        check_layout(ids, palette)
    except LayoutError as error:
        raise CanvasError(f"{Path(path).name}: {error}") from None
    return ids


def read_sketch_upload(path: str | Path) -> np.ndarray:
    """A drawing (any image file; dark lines on light paper or the reverse) as H×W uint8 grey;
    transparent parts count as white paper."""
    with _open_image(path, "a drawing") as image:
        rgba = image.convert("RGBA")
    paper = Image.new("RGBA", rgba.size, "white")
    return np.asarray(Image.alpha_composite(paper, rgba).convert("L"))


def read_depth_upload(path: str | Path) -> np.ndarray:
    """A depth file (PNG 8/16-bit, float TIFF or .npy; near = bright) as float32 [0, 1]."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        _open_image(path, "a depth map").close()
    try:
        return load_depth(path)
    except (ConditionError, OSError, ValueError) as error:
        raise CanvasError(f"{path.name}: {error}") from None


# --- resizing to the output size -----------------------------------------------------------


def resize_ids(ids: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of an id map (no new ids appear at class borders)."""
    if ids.shape == (height, width):
        return ids
    rows = (np.arange(height) * ids.shape[0] // height).clip(0, ids.shape[0] - 1)
    cols = (np.arange(width) * ids.shape[1] // width).clip(0, ids.shape[1] - 1)
    return ids[rows[:, None], cols[None, :]]


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area/bicubic resize of an RGB uint8 image."""
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))


def resize_depth(depth: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a float depth map."""
    if depth.shape == (height, width):
        return depth
    image = Image.fromarray(depth.astype(np.float32))  # mode F
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return np.clip(resized, 0.0, 1.0).astype(np.float32)


def scaled_canvases(
    layout: EditorValue,
    sketch: EditorValue,
    depth: EditorValue,
    width: int,
    height: int,
    palette: Palette,
) -> tuple[dict, dict, dict]:
    """The layout, sketch and depth canvases scaled to width × height (a new canvas size), so
    what the user painted stays; an empty or missing canvas becomes a blank one."""
    try:
        ids = edited_layout(layout, palette)
        new_layout = layout_canvas(resize_ids(ids, width, height), palette)
    except CanvasError:
        new_layout = blank_canvas(width, height)
    try:
        rgb = resize_rgb(sketch_from_canvas(sketch), width, height)
        new_sketch = {"background": rgb, "layers": [], "composite": rgb}
    except CanvasError:
        new_sketch = grey_canvas(width, height, 255)
    try:
        new_depth = depth_canvas(resize_depth(depth_from_canvas(depth), width, height))
    except CanvasError:
        new_depth = grey_canvas(width, height, 0)
    return new_layout, new_sketch, new_depth
