"""Spatial conditions other than layouts: depth maps, edge maps and low-resolution images.

Each is made two ways: derived from a photo for training (Canny edges, downsampled pixels, a
depth guess from the photo's label map) and read from what a user gives at use time (a depth
file, a sketch, a small photo). Both ways end in the same form, so one condition stage serves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from core.palette import Palette, load_label_map

logger = logging.getLogger(__name__)

__all__ = [
    "ConditionError",
    "canny_edges",
    "compare_with_midas",
    "depth_from_array",
    "downsample",
    "edge_f_score",
    "estimate_depth_from_layout",
    "load_depth",
    "load_human_edges",
    "sketch_to_edges",
    "spearman_correlation",
    "upsample_bicubic",
]

DEPTH_FORMATS = "8-bit or 16-bit greyscale PNG, float TIFF (32-bit, mode F) or .npy array"


class ConditionError(ValueError):
    """A condition given by the user (depth map, sketch, small photo) cannot be used."""


# --- depth --------------------------------------------------------------------------------


def depth_from_array(array: np.ndarray, invert: bool = False) -> np.ndarray:
    """Normalise a depth-like array (H×W, near = bright) to float32 [0, 1] per image.

    The 1st and 99th percentiles map to 0 and 1 and values beyond are clipped, so a few stray
    pixels do not squash the rest. Set invert for metric depth (large = far). Non-finite values
    count as far. A constant map gives zeros and a warning.
    """
    depth = np.asarray(array, dtype=np.float64)
    if depth.ndim == 3 and depth.shape[2] in (1, 3, 4):
        depth = depth[..., :3].mean(axis=2)  # a grey map saved as RGB(A)
    if depth.ndim != 2 or depth.size == 0:
        raise ConditionError(f"a depth map must be H×W; got shape {np.shape(array)}")
    finite = np.isfinite(depth)
    if not finite.any():
        raise ConditionError("the depth map holds no finite values; give a real depth map")
    if invert:
        depth = -depth
    low, high = np.percentile(depth[finite], [1.0, 99.0])
    if high - low <= 1e-12 * max(1.0, abs(high)):
        logger.warning("the depth map is constant; using a flat (all far) map instead")
        return np.zeros(depth.shape, dtype=np.float32)
    normalised = np.clip((depth - low) / (high - low), 0.0, 1.0)
    normalised[~finite] = 0.0
    return normalised.astype(np.float32)


def _read_depth_array(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    with Image.open(path) as image:
        if image.mode in ("RGB", "RGBA", "LA", "P"):
            image = image.convert("L")
        return np.asarray(image)


def load_depth(path: str | Path, invert: bool = False) -> np.ndarray:
    """Read a depth map file (near = bright) as float32 H×W in [0, 1]; see depth_from_array."""
    path = Path(path)
    try:
        array = _read_depth_array(path)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ConditionError(
            f"cannot read depth map {path}: {error}. Accepted: {DEPTH_FORMATS}"
        ) from error
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ConditionError(f"depth map {path} holds {array.dtype} values; {DEPTH_FORMATS}")
    return depth_from_array(array, invert=invert)


# Roles of palette classes in the layout depth heuristic, by class name. Names missing from a
# palette are skipped; classes named in none of these (unknown, free) count as ground.
_FAR_CLASSES = ("sky",)
_DISTANT_UPRIGHT_CLASSES = ("mountain",)
_UPRIGHT_CLASSES = ("tree", "bush", "building", "object")
_GROUND_CLASSES = ("grass", "rock", "water", "ground", "snow", "road")
_SUBJECT_CLASSES = ("object",)


def _class_mask(ids: np.ndarray, palette: Palette, names: tuple[str, ...]) -> np.ndarray:
    wanted = [index for index, name in enumerate(palette.names) if name in names]
    return np.isin(ids, wanted)


def _horizon_row(sky: np.ndarray, ground: np.ndarray) -> float:
    """Estimate the horizon row from the lowest sky rows and the highest ground rows."""
    height = sky.shape[0]
    rows = np.arange(height)[:, None]
    sky_columns = sky.any(axis=0)
    ground_columns = ground.any(axis=0)
    sky_bottom = np.where(sky, rows, -1).max(axis=0)[sky_columns]
    ground_top = np.where(ground, rows, height).min(axis=0)[ground_columns]
    if ground_top.size:
        horizon = float(np.median(ground_top))
        if sky_bottom.size:
            horizon = max(horizon, float(np.median(sky_bottom)))
        return horizon
    if sky_bottom.size:
        return float(np.median(sky_bottom))
    return -0.5 * height  # no sky, no ground: a close view, the horizon is above the frame


def _contact_rows(ids: np.ndarray, upright: np.ndarray) -> np.ndarray:
    """For each pixel, the row just below the bottom of its same-class vertical run (H×W).

    A run reaching the bottom edge gets `height`: its footing lies below the frame.
    """
    height = ids.shape[0]
    contact = np.empty(ids.shape, dtype=np.int64)
    contact[height - 1] = height
    for row in range(height - 2, -1, -1):
        same_run = upright[row] & (ids[row] == ids[row + 1])
        contact[row] = np.where(same_run, contact[row + 1], row + 1)
    return contact


def _apparent_size_depth(
    subject: np.ndarray, scale: float, ground_floor: float, close_px: int
) -> np.ndarray:
    """Inverse depth of each subject blob from its height in pixels: h_px × scale (H×W)."""
    mask = subject.astype(np.uint8)
    if close_px > 1:  # join the fragments a segmenter leaves of one animal or person
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close_px, close_px))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    heights = stats[:, cv2.CC_STAT_HEIGHT].astype(np.float64)
    depth = ground_floor + (1.0 - ground_floor) * np.clip(heights * scale, 0.0, 1.0)
    return np.where(subject, depth[labels], 0.0)


def _low_frequency_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    coarse = rng.standard_normal((4, 4)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def estimate_depth_from_layout(
    ids: np.ndarray,
    palette: Palette | None = None,
    rng: np.random.Generator | None = None,
    noise: float = 0.05,
    contact_weight: float = 0.5,
    mountain_scale: float = 0.5,
    subject_height_m: float = 1.5,
    camera_height_m: float = 1.6,
    ground_floor: float = 0.05,
    smoothing: float = 0.02,
) -> np.ndarray:
    """Guess a MiDaS-like inverse depth map (near = bright, float32 H×W in [0, 1]) from a layout.

    The rule, for a camera looking level over flat ground (inverse depth of flat ground is
    linear in the image row, zero at the horizon):
    - Horizon: the median highest row of the ground classes (grass, rock, water, ground, snow,
      road), kept below the median lowest sky row; with no ground, the sky's median bottom; with
      neither, half a frame above the top (a close view looking down).
    - Ground, unknown and free pixels: ground_floor at the horizon (and above it) rising
      linearly to 1 at the bottom row.
    - Sky: 0, the farthest.
    - Upright classes (tree, bush, building, object) stand where their column segment (the run
      of their class in that column) ends: contact_weight × the ground value of the row below
      that end, plus (1 − contact_weight) × the ground value of their own row, as tall things
      lean back (tree tops, roofs and hedges recede). A segment reaching the bottom edge
      stands on the nearest ground.
    - Objects (people, animals, vehicles) are also at least as near as their apparent size says:
      a blob h pixels tall of a thing subject_height_m tall is at inverse depth
      h × camera_height_m / (subject_height_m × rows from horizon to bottom), in the ground's
      units. Trees, bushes and buildings skip this cue: their segments are often groups (a
      forest, a hedge, a street) whose extent says little about distance.
    - Mountains take their upright value × mountain_scale: far, yet nearer than sky.
    - Blurred (Gaussian, sigma = smoothing × the shorter side) like MiDaS's soft edges; with
      rng, low-frequency noise of amplitude noise is added; rescaled to [0, 1].
    The defaults for contact_weight and the subject size cue were chosen by comparing with
    MiDaS on the data pack's 25 D-RIN photos (see compare_with_midas).
    """
    palette = palette or Palette.default()
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.size == 0:
        raise ConditionError(f"a layout must be an H×W array of ids; got shape {ids.shape}")
    height, width = ids.shape
    sky = _class_mask(ids, palette, _FAR_CLASSES)
    mountain = _class_mask(ids, palette, _DISTANT_UPRIGHT_CLASSES)
    upright = _class_mask(ids, palette, _UPRIGHT_CLASSES) | mountain
    ground = _class_mask(ids, palette, _GROUND_CLASSES)
    subject = _class_mask(ids, palette, _SUBJECT_CLASSES)

    horizon = _horizon_row(sky, ground)
    span = max(height - 1 - horizon, 1.0)  # rows from the horizon to the bottom edge
    rows = np.arange(height, dtype=np.float64)
    ground_by_row = ground_floor + (1.0 - ground_floor) * np.clip((rows - horizon) / span, 0, 1)
    depth = np.repeat(ground_by_row[:, None], width, axis=1)  # H×W

    contact = np.minimum(_contact_rows(ids, upright), height - 1)
    standing = contact_weight * ground_by_row[contact] + (1.0 - contact_weight) * depth
    if subject.any():
        scale = camera_height_m / (subject_height_m * span)
        close_px = int(0.05 * min(height, width)) | 1
        sized = _apparent_size_depth(subject, scale, ground_floor, close_px)
        standing = np.maximum(standing, sized)
    depth = np.where(upright, standing, depth)
    depth = np.where(mountain, mountain_scale * depth, depth)
    depth = np.where(sky, 0.0, depth).astype(np.float32)

    sigma = max(smoothing * min(height, width), 0.5)
    depth = cv2.GaussianBlur(depth, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REPLICATE)
    if rng is not None and noise > 0:
        depth = depth + noise * _low_frequency_noise((height, width), rng)
    low, high = float(depth.min()), float(depth.max())
    if high - low < 1e-6:
        return np.zeros((height, width), dtype=np.float32)
    return ((depth - low) / (high - low)).astype(np.float32)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks of a 1-D array, ties sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts
    return (first_rank + (counts - 1) / 2.0)[inverse]


def spearman_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation of two equally shaped arrays (ties get average ranks)."""
    first_ranks = _average_ranks(np.asarray(first, dtype=np.float64).ravel())
    second_ranks = _average_ranks(np.asarray(second, dtype=np.float64).ravel())
    first_ranks -= first_ranks.mean()
    second_ranks -= second_ranks.mean()
    norm = np.sqrt((first_ranks**2).sum() * (second_ranks**2).sum())
    return float((first_ranks * second_ranks).sum() / norm) if norm > 0 else 0.0


def compare_with_midas(index_path: str | Path, **heuristic: float) -> tuple[float, list[float]]:
    """Mean Spearman correlation of layout depth (from `pseudo`) with MiDaS `depth` maps.

    Reads every index.jsonl row with a `depth` field; paths are relative to the index's folder.
    Keyword arguments go to estimate_depth_from_layout. Returns the mean and each photo's value.
    """
    index_path = Path(index_path)
    rows = [json.loads(line) for line in index_path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("depth") and row.get("pseudo")]
    if not rows:
        raise ConditionError(f"{index_path} has no rows with both `depth` and `pseudo` maps")
    palette = Palette.default()
    scores = []
    for row in rows:
        ids = load_label_map(index_path.parent / row["pseudo"], palette)
        midas = load_depth(index_path.parent / row["depth"])
        if midas.shape != ids.shape:
            midas = cv2.resize(midas, (ids.shape[1], ids.shape[0]), interpolation=cv2.INTER_AREA)
        estimate = estimate_depth_from_layout(ids, palette, **heuristic)
        scores.append(spearman_correlation(estimate, midas))
    return float(np.mean(scores)), scores


# --- edges --------------------------------------------------------------------------------


def _to_grey(image: np.ndarray | Image.Image) -> np.ndarray:
    """Grey uint8 H×W from an H×W, H×W×3 or H×W×4 uint8 image (transparent = white paper)."""
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        raise ConditionError(f"expected a uint8 image; got {pixels.dtype}. Convert it to 8-bit")
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        alpha = pixels[..., 3:4].astype(np.float32) / 255.0
        composite = pixels[..., :3] * alpha + 255.0 * (1.0 - alpha)
        pixels = np.round(composite).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    raise ConditionError(f"expected an H×W grey or H×W×3/4 image; got shape {pixels.shape}")


def canny_edges(
    image_rgb: np.ndarray | Image.Image, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Canny edges of a photo as uint8 H×W {0, 255}, after a light Gaussian blur.

    Thresholds are 50/150 on 0..255 grey; with rng (training) the low one is drawn in [35, 75]
    and the high one 2–3.5 times that, so the model sees sparser and denser edge maps.
    """
    grey = cv2.GaussianBlur(_to_grey(image_rgb), (5, 5), sigmaX=1.0)
    low, high = 50.0, 150.0
    if rng is not None:
        low = float(rng.uniform(35.0, 75.0))
        high = low * float(rng.uniform(2.0, 3.5))
    return cv2.Canny(grey, low, high, L2gradient=True)


def _thin(binary: np.ndarray) -> np.ndarray:
    """Thin a {0,1} uint8 mask to one-pixel-wide curves (Zhang–Suen thinning, vectorised)."""
    image = np.pad(binary.astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            # The eight neighbours, clockwise from north: P2..P9 of the usual notation.
            centre = image[1:-1, 1:-1]
            north, south = image[:-2, 1:-1], image[2:, 1:-1]
            west, east = image[1:-1, :-2], image[1:-1, 2:]
            north_east, south_east = image[:-2, 2:], image[2:, 2:]
            south_west, north_west = image[2:, :-2], image[:-2, :-2]
            ring = [north, north_east, east, south_east, south, south_west, west, north_west]
            neighbours = sum(n.astype(np.int16) for n in ring)
            transitions = sum(
                ((ring[i] == 0) & (ring[(i + 1) % 8] == 1)).astype(np.int16) for i in range(8)
            )
            if step == 0:
                first = north * east * south
                second = east * south * west
            else:
                first = north * east * west
                second = north * south * west
            remove = (
                (centre == 1)
                & (neighbours >= 2)
                & (neighbours <= 6)
                & (transitions == 1)
                & (first == 0)
                & (second == 0)
            )
            if remove.any():
                centre[remove] = 0  # a view into image: thins in place
                changed = True
        if not changed:
            return image[1:-1, 1:-1].copy()


def sketch_to_edges(image: np.ndarray | Image.Image, min_contrast: int = 24) -> np.ndarray:
    """Turn a user's sketch into thin edges like Canny's: uint8 H×W {0, 255}.

    Either dark strokes on light paper or light strokes on dark: the paper is the border's
    median grey. Otsu's threshold separates strokes from paper, and strokes of any width are
    thinned to one-pixel centre lines. A sketch with less contrast than min_contrast grey levels
    is blank and gives no edges.
    """
    grey = _to_grey(image)
    if int(grey.max()) - int(grey.min()) < min_contrast:
        return np.zeros(grey.shape, dtype=np.uint8)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    paper = int(np.median(border))
    if paper - int(grey.min()) > int(grey.max()) - paper:
        grey = 255 - grey  # strokes darker than the paper: make them bright
    _, strokes = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return _thin(strokes) * np.uint8(255)


def resize_edges(edges: np.ndarray, width: int, height: int) -> np.ndarray:
    """Thin edges (uint8 {0, 255}) at width × height, every line kept.

    Shrinking uses area scaling, where any covered pixel stays an edge, then thins again; a
    nearest-neighbour shrink would drop most one-pixel lines. Growing repeats pixels.
    """
    if edges.shape[:2] == (height, width):
        return edges
    if width >= edges.shape[1] and height >= edges.shape[0]:
        return cv2.resize(edges, (width, height), interpolation=cv2.INTER_NEAREST)
    covered = cv2.resize(edges, (width, height), interpolation=cv2.INTER_AREA) > 0
    return _thin(covered.astype(np.uint8)) * np.uint8(255)


def load_human_edges(path: str | Path, threshold: float = 0.25) -> np.ndarray:
    """A BSDS500 soft boundary map (0–255, mean of annotators) as thin uint8 {0, 255} edges.

    A pixel is an edge where at least `threshold` of the annotators drew one (value ≥
    threshold × 255); the marked bands are thinned to one-pixel curves like sketch_to_edges.
    """
    try:
        with Image.open(path) as image:
            soft = np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError) as error:
        raise ConditionError(f"cannot read edge map {path}: {error}; give a grey PNG") from error
    marked = (soft.astype(np.float32) >= threshold * 255.0 - 0.5).astype(np.uint8)
    return _thin(marked) * np.uint8(255)


def edge_f_score(predicted: np.ndarray, target: np.ndarray, tolerance_px: float = 2.0) -> float:
    """F-measure of two edge maps (nonzero = edge), matching within tolerance_px pixels.

    Precision: share of predicted edge pixels within the tolerance of a target edge; recall: the
    reverse. Two empty maps agree fully (1); one empty map against edges scores 0.
    """
    predicted = np.asarray(predicted) > 0
    target = np.asarray(target) > 0
    if predicted.shape != target.shape:
        raise ConditionError(f"edge maps differ in shape: {predicted.shape} vs {target.shape}")
    if not predicted.any() and not target.any():
        return 1.0
    if not predicted.any() or not target.any():
        return 0.0
    to_target = cv2.distanceTransform((~target).astype(np.uint8), cv2.DIST_L2, 5)
    to_predicted = cv2.distanceTransform((~predicted).astype(np.uint8), cv2.DIST_L2, 5)
    precision = float((to_target[predicted] <= tolerance_px).mean())
    recall = float((to_predicted[target] <= tolerance_px).mean())
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


# --- low resolution -----------------------------------------------------------------------


def downsample(image_rgb: np.ndarray | Image.Image, factor: int) -> np.ndarray:
    """Shrink an image by an integer factor with Lanczos antialiasing (sizes round down)."""
    pixels = np.asarray(image_rgb)
    if factor < 1 or int(factor) != factor:
        raise ConditionError(f"the downsampling factor must be a whole number ≥ 1; got {factor}")
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ConditionError(
            f"expected an H×W or H×W×3 uint8 image; got {pixels.shape} {pixels.dtype}"
        )
    height, width = pixels.shape[:2]
    size = (max(1, width // factor), max(1, height // factor))
    if size[0] * factor != width or size[1] * factor != height:
        logger.debug("size %dx%d is not a multiple of %d; rounding down", width, height, factor)
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def upsample_bicubic(image: np.ndarray | Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize an image (uint8 or float, H×W or H×W×C) to size = (width, height), bicubic."""
    pixels = np.asarray(image)
    width, height = (int(value) for value in size)
    if width < 1 or height < 1:
        raise ConditionError(f"the target size must be positive (width, height); got {size}")
    resized = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_CUBIC)
    if pixels.ndim == 3 and resized.ndim == 2:
        resized = resized[..., None]  # cv2 drops a single channel axis
    return resized


def back_project(
    image_rgb: np.ndarray, small_rgb: np.ndarray, factor: int, iterations: int = 3
) -> np.ndarray:
    """Make an enlargement agree with the small photo it came from (iterative back-projection).

    Each round shrinks the image as `downsample` does, and adds the bicubically enlarged
    difference to the small photo: the low frequencies (colours, shapes at the small photo's
    scale) come back to the photo's own, the detail above that scale stays the generated one.
    image_rgb is H×W×3 uint8 with H, W = factor × small's size.
    """
    small = np.asarray(small_rgb)
    height, width = np.asarray(image_rgb).shape[:2]
    if small.shape[:2] != (height // factor, width // factor) or height % factor or width % factor:
        raise ConditionError(
            f"a {width}×{height} image is not ×{factor} of a {small.shape[1]}×{small.shape[0]} "
            "photo; back-projection needs the exact enlargement"
        )
    target = small[..., :3].astype(np.float32)
    result = np.asarray(image_rgb, dtype=np.float32)
    for _ in range(iterations):
        shrunk = downsample(result.clip(0, 255).round().astype(np.uint8), factor)
        result = result + upsample_bicubic(target - shrunk.astype(np.float32), (width, height))
    return result.clip(0, 255).round().astype(np.uint8)
