"""Training data: photos (and their aligned condition maps) from an index file or a folder.

Photos are read once into memory at a bounded size, bad files are skipped with a warning that
names them, and batches of random crops are drawn from a generator seeded by (seed, rank, step),
so a resumed run sees the same data order and each DDP rank draws its own share.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


# The landscape data pack beside the repository (../shared/data).
DEFAULT_INDEX = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "index.jsonl"


class DataError(ValueError):
    """The training data cannot be used (empty folder, unknown split, no usable photo)."""


@dataclass
class Record:
    """One photo and, where present, its aligned condition files."""

    photo: Path
    label: Path | None = None  # palette label map (ids)
    edges: Path | None = None  # human edge map
    depth: Path | None = None
    scene: str | None = None
    source: str = "folder"


def read_index(index: str | Path, split: str, min_nature_share: float = 0.0) -> list[Record]:
    """Records of one split of an `index.jsonl` like ../shared/data's."""
    index = Path(index)
    if not index.is_file():
        raise DataError(f"index file {index} does not exist")
    root = index.parent
    records = []
    splits = set()
    for line in index.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        splits.add(row.get("split"))
        if row.get("split") != split or row.get("nature_share", 1.0) < min_nature_share:
            continue
        label = row.get("label") or row.get("pseudo")
        records.append(
            Record(
                photo=root / row["photo"],
                label=root / label if label else None,
                edges=root / row["edges_human"] if row.get("edges_human") else None,
                depth=root / row["depth"] if row.get("depth") else None,
                scene=row.get("scene"),
                source=row.get("source", "index"),
            )
        )
    if not records:
        raise DataError(
            f"{index} has no photos in split '{split}' with nature_share >= {min_nature_share} "
            f"(splits present: {', '.join(sorted(str(s) for s in splits))})"
        )
    return records


def _same_named(folder: Path | None, stem: str) -> Path | None:
    if folder is None:
        return None
    for suffix in (".png", ".npy", ".tif", ".tiff", ".jpg", ".jpeg"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_folder(
    photos: str | Path,
    labels: str | Path | None = None,
    edges: str | Path | None = None,
    depth: str | Path | None = None,
) -> list[Record]:
    """Records for a user's folder of photos, with same-named condition files beside them."""
    photos = Path(photos)
    if not photos.is_dir():
        raise DataError(f"photo folder {photos} does not exist")
    files = sorted(p for p in photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"{photos} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "put your photos there or point at another folder"
        )
    folders = [Path(f) if f else None for f in (labels, edges, depth)]
    return [
        Record(
            photo=file,
            label=_same_named(folders[0], file.stem),
            edges=_same_named(folders[1], file.stem),
            depth=_same_named(folders[2], file.stem),
        )
        for file in files
    ]


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB; grey, CMYK, alpha and 16-bit images are converted.

    Raises `DataError` naming the file when it cannot be read.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return _to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a readable image ({error})") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        grey = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        grey = ((array - array.min()) / span * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _bounded(image: np.ndarray, max_short_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    short = min(h, w)
    if short <= max_short_side:
        return image
    scale = max_short_side / short
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def load_photos(
    records: list[Record], min_side: int, max_short_side: int, progress: bool = True
) -> tuple[list[np.ndarray], list[Record]]:
    """Read the photos into memory; unreadable or too-small ones are skipped with a warning."""
    images, kept = [], []
    for record in tqdm(records, desc="reading photos", disable=not progress, unit="img"):
        try:
            image = load_rgb(record.photo)
        except DataError as error:
            logger.warning("skipping %s", error)
            continue
        if min(image.shape[:2]) < min_side:
            logger.warning(
                "skipping %s: %dx%d is smaller than the %d px crop",
                record.photo,
                image.shape[1],
                image.shape[0],
                min_side,
            )
            continue
        images.append(_bounded(image, max_short_side))
        kept.append(record)
    if not images:
        raise DataError(
            f"none of the {len(records)} photos could be used (all unreadable or smaller than "
            f"{min_side} px); check the folder or lower the crop size"
        )
    if len(images) < len(records):
        logger.warning("using %d of %d photos", len(images), len(records))
    return images, kept


def step_generator(seed: int, rank: int, step: int) -> np.random.Generator:
    """The random source for one step of one rank: resuming at `step` replays the same data."""
    return np.random.default_rng([seed, rank, step])


def random_crop_box(
    height: int, width: int, crop: int, rng: np.random.Generator, scale_range: float
) -> tuple[float, int, int]:
    """A random rescale factor and the top-left of a crop×crop box in the rescaled image."""
    short = min(height, width)
    low = crop / short
    high = max(low, min(1.0, low * scale_range))
    scale = float(rng.uniform(low, high))
    h, w = max(crop, round(height * scale)), max(crop, round(width * scale))
    return scale, int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))


def crop_image(
    image: np.ndarray, crop: int, rng: np.random.Generator, scale_range: float = 2.0
) -> tuple[np.ndarray, tuple]:
    """A random (rescaled, flipped) crop, and the geometry to apply to aligned maps."""
    height, width = image.shape[:2]
    scale, top, left = random_crop_box(height, width, crop, rng, scale_range)
    flip = bool(rng.random() < 0.5)
    geometry = (scale, top, left, crop, flip)
    return apply_geometry(image, geometry, Image.Resampling.BILINEAR), geometry


def apply_geometry(array: np.ndarray, geometry: tuple, resample) -> np.ndarray:
    """Rescale, crop and flip an array (image or aligned map) as `crop_image` did."""
    scale, top, left, crop, flip = geometry
    height, width = array.shape[:2]
    size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    if size != (width, height):
        array = np.asarray(Image.fromarray(array).resize(size, resample))
    array = array[top : top + crop, left : left + crop]
    return np.ascontiguousarray(array[:, ::-1] if flip else array)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 images -> float B,3,H,W in [-1, 1]."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def to_uint8(batch: torch.Tensor) -> np.ndarray:
    """float B,3,H,W in [-1, 1] -> uint8 B,H,W,3."""
    pixels = ((batch.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return pixels.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


class PhotoCrops:
    """Random crops of photos held in memory; `batch(step)` is deterministic per step."""

    def __init__(self, images: list[np.ndarray], crop: int, seed: int, rank: int = 0, world=1):
        # each rank crops its own share of the photos (all of them when there are too few)
        self.images = images[rank::world] if len(images) >= world else images
        self.crop = crop
        self.seed = seed
        self.rank = rank

    def batch(self, step: int, size: int) -> torch.Tensor:
        rng = step_generator(self.seed, self.rank, step)
        picks = rng.integers(0, len(self.images), size)
        crops = [crop_image(self.images[i], self.crop, rng)[0] for i in picks]
        return to_tensor(crops)
