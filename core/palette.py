"""The painting palette and the layouts painted with it.

A layout is an H×W array of palette ids. The studio's canvas arrives as RGB(A) pixels and is
snapped to the palette here; label maps from the data pack arrive as PNGs of ids. Besides the
palette's own classes there is one more id, FREE (= number of classes): "unpainted, the model
decides". Condition stages therefore see `palette.num_condition_classes` = classes + 1 values.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "FREE_ID",
    "FREE_NAME",
    "LayoutError",
    "Palette",
    "PaletteError",
    "check_layout",
    "flood_fill",
    "ids_to_rgb",
    "label_map_image",
    "load_label_map",
    "off_palette_share",
    "random_free_regions",
    "rgb_to_ids",
    "sanitize_ids",
]

RGB = tuple[int, int, int]

# The data pack's palette (../shared/data/palette.json), kept here so the project runs alone.
_DEFAULT_ENTRIES: tuple[tuple[str, RGB], ...] = (
    ("unknown", (0, 0, 0)),
    ("sky", (135, 206, 235)),
    ("tree", (34, 139, 34)),
    ("grass", (124, 252, 0)),
    ("bush", (107, 142, 35)),
    ("mountain", (160, 82, 45)),
    ("rock", (128, 128, 128)),
    ("water", (30, 144, 255)),
    ("ground", (244, 164, 96)),
    ("snow", (255, 255, 255)),
    ("road", (70, 70, 70)),
    ("building", (178, 34, 34)),
    ("object", (255, 0, 255)),
)

FREE_NAME = "free"
# Light grey: no palette class uses it (rock is 128,128,128), so a painted "free" area reads back.
_FREE_COLOUR: RGB = (200, 200, 200)
# FREE of the default palette; for any other palette use `palette.free_id`.
FREE_ID = len(_DEFAULT_ENTRIES)


class LayoutError(ValueError):
    """A painted or loaded layout cannot be used as it is (the message says what to change)."""


class PaletteError(ValueError):
    """A palette file is malformed."""


@dataclass(frozen=True)
class Palette:
    """Class names and display colours; the id of a class is its position."""

    names: tuple[str, ...]
    colours: tuple[RGB, ...]
    free_colour: RGB = _FREE_COLOUR

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colours) or not self.names:
            raise PaletteError(
                f"a palette needs one colour per class; got {len(self.names)} names and "
                f"{len(self.colours)} colours"
            )
        if len(set(self.colours)) != len(self.colours):
            raise PaletteError("two palette classes share a colour; give each class its own")
        if tuple(self.free_colour) in self.colours:
            raise PaletteError(
                f"the free colour {self.free_colour} is also a class colour; pick another"
            )

    @classmethod
    def default(cls) -> Palette:
        """The project's 13-class landscape palette."""
        return cls(
            names=tuple(name for name, _ in _DEFAULT_ENTRIES),
            colours=tuple(colour for _, colour in _DEFAULT_ENTRIES),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> Palette:
        """Read a palette JSON: a list of {"id", "name", "rgb"} with ids 0..K-1."""
        try:
            entries = json.loads(Path(path).read_text())
            entries = sorted(entries, key=lambda entry: int(entry["id"]))
            ids = [int(entry["id"]) for entry in entries]
            names = tuple(str(entry["name"]) for entry in entries)
            colours = tuple(_as_rgb(entry["rgb"]) for entry in entries)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise PaletteError(
                f"cannot read palette {path}: {error}; expected a JSON list of "
                '{"id": int, "name": str, "rgb": [r, g, b]}'
            ) from error
        if ids != list(range(len(ids))):
            raise PaletteError(f"palette {path} ids must be 0..{len(ids) - 1} without gaps")
        return cls(names=names, colours=colours)

    @property
    def num_classes(self) -> int:
        """Number of palette classes (free not included)."""
        return len(self.names)

    @property
    def ids(self) -> tuple[int, ...]:
        """Ids of the palette classes, 0..K-1."""
        return tuple(range(self.num_classes))

    @property
    def free_id(self) -> int:
        """The id meaning "unpainted, the model decides"."""
        return self.num_classes

    @property
    def num_condition_classes(self) -> int:
        """Values a layout condition can take: the classes plus free."""
        return self.num_classes + 1

    def id_of(self, name: str) -> int:
        """Id of a class by name ("free" included)."""
        if name == FREE_NAME:
            return self.free_id
        try:
            return self.names.index(name)
        except ValueError:
            raise LayoutError(
                f"no class named {name!r}; the palette has {', '.join(self.names)} and free"
            ) from None

    def colour_table(self) -> np.ndarray:
        """Display colours of ids 0..K, free last: (K+1, 3) uint8."""
        return np.array([*self.colours, self.free_colour], dtype=np.uint8)


def _as_rgb(value: object) -> RGB:
    red, green, blue = (int(channel) for channel in value)  # type: ignore[union-attr]
    if not all(0 <= channel <= 255 for channel in (red, green, blue)):
        raise ValueError(f"colour {value} has channels outside 0..255")
    return red, green, blue


def _colour_keys(rgb: np.ndarray) -> np.ndarray:
    """Pack uint8 RGB triples (…, 3) into one int32 per colour."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _snap_candidates(palette: Palette, background: RGB | None) -> tuple[np.ndarray, np.ndarray]:
    """Colours a pixel may snap to and the id each stands for."""
    colours: list[RGB] = []
    ids: list[int] = []
    for class_id, colour in enumerate(palette.colours):
        if background is not None and colour == background:
            continue  # on this canvas the colour is paper, not the class
        colours.append(colour)
        ids.append(class_id)
    colours.append(palette.free_colour)
    ids.append(palette.free_id)
    if background is not None and background != palette.free_colour:
        colours.append(background)
        ids.append(palette.free_id)
    return np.array(colours, dtype=np.uint8), np.array(ids, dtype=np.int64)


def _nearest_candidate(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Index of the nearest candidate colour (Euclidean RGB) for each pixel (N, 3)."""
    pixels = pixels.astype(np.int32)
    best = np.full(len(pixels), np.iinfo(np.int32).max, dtype=np.int32)
    best_index = np.zeros(len(pixels), dtype=np.int64)
    for index, colour in enumerate(colours.astype(np.int32)):
        distance = ((pixels - colour) ** 2).sum(axis=1)
        closer = distance < best
        best[closer] = distance[closer]
        best_index[closer] = index
    return best_index


def _majority_filter(ids: np.ndarray, snapped: np.ndarray, num_ids: int, size: int) -> np.ndarray:
    """Replace snapped pixels by the weighted majority id of their size×size neighbourhood.

    Exactly painted pixels vote twice, snapped ones once: a thin band of a third class along a
    stroke border loses to the two classes it separates.
    """
    weights = np.where(snapped, 1.0, 2.0).astype(np.float32)
    votes = np.empty((num_ids, *ids.shape), dtype=np.float32)
    for class_id in range(num_ids):
        plane = np.where(ids == class_id, weights, 0.0).astype(np.float32)
        votes[class_id] = cv2.boxFilter(
            plane, -1, (size, size), normalize=False, borderType=cv2.BORDER_REPLICATE
        )
    winner = votes.argmax(axis=0)
    return np.where(snapped, winner, ids)


def rgb_to_ids(
    image: np.ndarray | Image.Image,
    palette: Palette | None = None,
    background: RGB | None = None,
    filter_size: int = 5,
) -> np.ndarray:
    """Snap a painted canvas (H×W×3 or H×W×4 uint8) to palette ids (H×W int64).

    The rule, in order:
    1. Pixels with alpha < 128 are FREE.
    2. Pixels equal to `background` (the canvas's paper colour) are FREE. If the paper colour is
       also a class colour (white paper and snow), that class cannot be painted on this canvas:
       a white canvas must not turn into snow. To paint snow, use a canvas whose paper is not
       white (or transparent), or upload a palette image: the studio passes `background=None`
       for uploads, and then white is snow.
    3. Pixels exactly equal to a palette colour take its id; the free display colour is FREE.
    4. Any other pixel (anti-aliased stroke edges, JPEG damage) snaps to the nearest candidate
       colour of rules 2–3 in RGB, and then takes the majority id of its filter_size×filter_size
       neighbourhood, exact pixels voting twice. Only these snapped pixels are filtered.
    """
    palette = palette or Palette.default()
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise LayoutError(
            f"a painted layout must be an H×W×3 or H×W×4 uint8 image; got shape {pixels.shape} "
            f"and dtype {pixels.dtype}. Convert it to RGB or RGBA first"
        )
    background = tuple(int(c) for c in background[:3]) if background is not None else None
    colours, candidate_ids = _snap_candidates(palette, background)

    keys = _colour_keys(pixels[..., :3])
    order = np.argsort(_colour_keys(colours), kind="stable")
    sorted_keys = _colour_keys(colours)[order]
    position = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
    exact = sorted_keys[position] == keys
    ids = candidate_ids[order[position]]

    snapped = ~exact
    if pixels.shape[2] == 4:
        transparent = pixels[..., 3] < 128
        ids[transparent] = palette.free_id
        snapped &= ~transparent
    if snapped.any():
        nearest = _nearest_candidate(pixels[..., :3][snapped], colours)
        ids[snapped] = candidate_ids[nearest]
        ids = _majority_filter(ids, snapped, palette.num_condition_classes, filter_size)
    return ids.astype(np.int64)


def ids_to_rgb(ids: np.ndarray, palette: Palette | None = None) -> np.ndarray:
    """Show a layout (H×W ids) in palette colours, FREE in its display colour: H×W×3 uint8."""
    palette = palette or Palette.default()
    ids = np.asarray(ids)
    _require_valid_ids(ids, palette)
    return palette.colour_table()[ids]


def label_map_image(ids: np.ndarray, palette: Palette | None = None) -> Image.Image:
    """A mode-P image of a layout: pixel values are ids, embedded colours the palette's."""
    palette = palette or Palette.default()
    ids = np.asarray(ids)
    _require_valid_ids(ids, palette)
    image = Image.fromarray(ids.astype(np.uint8))  # mode L; putpalette makes it P
    image.putpalette(palette.colour_table().ravel().tolist())
    return image


def _require_valid_ids(ids: np.ndarray, palette: Palette) -> None:
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise LayoutError(f"a layout must be an H×W integer array; got {ids.shape} {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > palette.free_id):
        raise LayoutError(
            f"layout ids must lie in 0..{palette.free_id}; found {ids.min()}..{ids.max()}. "
            "Pass it through sanitize_ids first"
        )


def sanitize_ids(
    ids: np.ndarray, palette: Palette | None = None, allow_free: bool = True
) -> tuple[np.ndarray, int]:
    """Set ids outside the palette (255 included) to unknown (0); return them and the count."""
    palette = palette or Palette.default()
    highest = palette.free_id if allow_free else palette.num_classes - 1
    ids = np.asarray(ids).astype(np.int64)
    outside = (ids < 0) | (ids > highest)
    count = int(outside.sum())
    if count:
        note = f" ({palette.free_id} = free)" if allow_free else ""
        logger.warning(
            "%s pixels had ids outside 0..%d%s; set to unknown (0)", f"{count:,}", highest, note
        )
        ids = np.where(outside, 0, ids)
    return ids, count


def load_label_map(
    source: str | Path | Image.Image, palette: Palette | None = None, allow_free: bool = True
) -> np.ndarray:
    """Read a layout: a PNG of ids (mode L, P or I) as is, an RGB(A) image via rgb_to_ids.

    Ids outside the palette become unknown (0) with one warning that counts them. An RGB image
    is taken as an uploaded palette image, so white is snow (no paper colour).
    """
    palette = palette or Palette.default()
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
    except OSError as error:
        raise LayoutError(
            f"cannot read layout {source}: {error}; give a PNG of palette ids (mode L or P) "
            "or an image painted in palette colours"
        ) from error
    if image.mode in ("L", "P", "I", "I;16"):
        ids, _ = sanitize_ids(np.asarray(image), palette, allow_free)
        return ids
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    pixels = np.asarray(image)
    share = off_palette_share(pixels, palette)
    if share > OFF_PALETTE_LIMIT:
        raise LayoutError(
            f"this image does not look like a layout: {share:.0%} of its pixels are far from "
            "every palette colour (a photo?); give a PNG of class ids or an image painted in the "
            "palette's colours"
        )
    return rgb_to_ids(pixels, palette, background=None)


# An uploaded palette image, even saved as JPEG, has under 20% of its pixels farther than
# OFF_PALETTE_DISTANCE from every palette colour; val photos have 50-99%.
OFF_PALETTE_DISTANCE = 20
OFF_PALETTE_LIMIT = 0.4


def off_palette_share(pixels: np.ndarray, palette: Palette) -> float:
    """Share of the opaque pixels of an H×W×3/4 uint8 image (every 4th row and column) that lie
    farther than OFF_PALETTE_DISTANCE (RGB) from every palette colour and the free colour."""
    sample = pixels[::4, ::4].reshape(-1, pixels.shape[-1])
    if sample.shape[1] == 4:
        sample = sample[sample[:, 3] >= 128]
    if len(sample) == 0:
        return 0.0
    colours, _ = _snap_candidates(palette, None)
    nearest = colours[_nearest_candidate(sample[:, :3], colours)].astype(np.int32)
    distance = np.sqrt(((sample[:, :3].astype(np.int32) - nearest) ** 2).sum(axis=1))
    return float((distance > OFF_PALETTE_DISTANCE).mean())


def check_layout(ids: np.ndarray, palette: Palette | None = None) -> None:
    """Raise LayoutError unless the layout is H×W ids in range with at least one painted class."""
    palette = palette or Palette.default()
    ids = np.asarray(ids)
    _require_valid_ids(ids, palette)
    painted = (ids > 0) & (ids < palette.free_id)
    if not painted.any():
        raise LayoutError("the layout uses no known class; paint at least one class")


def flood_fill(
    ids: np.ndarray, point: tuple[int, int], class_id: int, palette: Palette | None = None
) -> np.ndarray:
    """Give class_id to the 4-connected region of equal ids under point = (x, y); a new array."""
    palette = palette or Palette.default()
    ids = np.asarray(ids)
    _require_valid_ids(ids, palette)
    if not 0 <= class_id <= palette.free_id:
        raise LayoutError(f"class id {class_id} is not in 0..{palette.free_id}")
    x, y = (int(value) for value in point)
    height, width = ids.shape
    if not (0 <= x < width and 0 <= y < height):
        raise LayoutError(f"fill point (x={x}, y={y}) lies outside the {width}×{height} layout")

    image = ids.astype(np.uint8)  # ids are at most free_id, far below 256
    mask = np.zeros((height + 2, width + 2), dtype=np.uint8)
    flags = 4 | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
    cv2.floodFill(image, mask, (x, y), 0, loDiff=0, upDiff=0, flags=flags)
    region = mask[1:-1, 1:-1].astype(bool)
    filled = ids.astype(np.int64)
    filled[region] = class_id
    return filled


def _random_rectangle(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    height, width = shape
    box_height = int(rng.integers(max(1, height // 8), height + 1))
    box_width = int(rng.integers(max(1, width // 8), width + 1))
    top = int(rng.integers(0, height - box_height + 1))
    left = int(rng.integers(0, width - box_width + 1))
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + box_height, left : left + box_width] = True
    return mask


def _random_blob(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A smooth irregular region: coarse noise, upsampled, thresholded."""
    height, width = shape
    coarse = rng.random((int(rng.integers(2, 6)), int(rng.integers(2, 6)))).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return field > np.quantile(field, rng.uniform(0.5, 0.9))


def random_free_regions(
    ids: np.ndarray,
    rng: np.random.Generator,
    palette: Palette | None = None,
    p_none: float = 0.3,
    p_most: float = 0.1,
    max_shapes: int = 3,
) -> np.ndarray:
    """Training augmentation: set random regions of a layout to FREE; a new array.

    With probability p_none nothing changes; with p_most all but one or two blobs become free
    (the user painted only a little); otherwise 1..max_shapes rectangles and blobs become free.
    The model thus learns that free means "decide yourself".
    """
    palette = palette or Palette.default()
    ids = np.asarray(ids).astype(np.int64)
    choice = rng.random()
    if choice < p_none:
        return ids.copy()
    shape = (ids.shape[0], ids.shape[1])
    if choice < p_none + p_most:
        keep = np.zeros(shape, dtype=bool)
        for _ in range(int(rng.integers(1, 3))):
            keep |= _random_blob(shape, rng)
        return np.where(keep, ids, palette.free_id)
    free = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        free |= _random_rectangle(shape, rng) if rng.random() < 0.5 else _random_blob(shape, rng)
    return np.where(free, palette.free_id, ids)
