"""Condition stages: how each spatial condition becomes model input, and their training data.

Each spatial condition (layout, edges, depth) has a small VQGAN of its own (`core.vqgan.VQGAN`
with other channels) trained by the stage-1 loop without a GAN: layouts are one-hot in and
class logits out with cross-entropy (as in the paper), edges and depth are one channel in
[-1, 1] with an L1 loss. Low-resolution photos need no stage of their own: they are upsampled
bicubically and encoded by the image VQGAN, so their token grid matches the image grid.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from core.conditions import (
    canny_edges,
    estimate_depth_from_layout,
    load_depth,
    load_human_edges,
)
from core.data import (
    DataError,
    Record,
    apply_geometry,
    crop_image,
    load_photos,
    step_generator,
)
from core.palette import Palette, ids_to_rgb, load_label_map, random_free_regions

logger = logging.getLogger(__name__)

SPATIAL_KINDS = ("layout", "edges", "depth")


def channels_for(kind: str, palette: Palette) -> int:
    """Input (and output) channels of a condition stage."""
    if kind == "layout":
        return palette.num_condition_classes
    if kind in ("edges", "depth"):
        return 1
    raise ValueError(f"unknown condition kind '{kind}'; expected one of {SPATIAL_KINDS}")


def layout_input(ids: np.ndarray | torch.Tensor, palette: Palette) -> torch.Tensor:
    """Ids B×H×W (or H×W) -> one-hot B×C×H×W float, free included."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if ids.dim() == 2:
        ids = ids[None]
    one_hot = torch.nn.functional.one_hot(ids, palette.num_condition_classes)
    return one_hot.permute(0, 3, 1, 2).float()


def scalar_input(maps: np.ndarray | torch.Tensor, scale: float) -> torch.Tensor:
    """One-channel maps B×H×W (or H×W) with values in [0, scale] -> B×1×H×W in [-1, 1]."""
    maps = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    if maps.dim() == 2:
        maps = maps[None]
    return (maps / scale * 2.0 - 1.0)[:, None]


def condition_input(kind: str, maps, palette: Palette) -> torch.Tensor:
    """Model input for a condition map: layout ids, edges (uint8 0/255) or depth in [0, 1]."""
    if kind == "layout":
        return layout_input(maps, palette)
    if kind == "edges":  # thin lines are thickened to 3 px so a few strokes still register
        maps = np.asarray(maps, dtype=np.uint8)
        kernel = np.ones((3, 3), np.uint8)
        thick = np.stack([cv2.dilate(m, kernel) for m in maps.reshape(-1, *maps.shape[-2:])])
        return scalar_input(thick.reshape(maps.shape), 255.0)
    if kind == "depth":
        return scalar_input(maps, 1.0)
    raise ValueError(f"unknown condition kind '{kind}'; expected one of {SPATIAL_KINDS}")


def condition_display(kind: str, output: torch.Tensor, palette: Palette) -> np.ndarray:
    """Stage output (or input) B×C×H×W -> uint8 B×H×W×3 pictures for sample grids."""
    if kind == "layout":
        ids = (output if output.dim() == 3 else output.argmax(1)).cpu().numpy()
        return np.stack([ids_to_rgb(i, palette) for i in ids])
    grey = ((output[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return np.repeat(grey.numpy()[..., None], 3, axis=3)


class ConditionBatches:
    """Aligned random crops of condition maps for a condition stage's training.

    Layouts come from the records' label maps (ground truth where the data has it, pseudo
    labels otherwise) with random regions set free; edges are the record's own edge map where
    it has one (data.edges), else Canny edges of the photo crop with light random thresholds;
    depth is the record's own depth map where it has one (data.depth), else estimated from the
    whole label map, then cropped.
    """

    def __init__(
        self, kind: str, records: list[Record], crop: int, seed: int, palette: Palette,
        rank: int = 0,
    ):  # fmt: skip
        self.kind = kind
        self.rank = rank  # each DDP rank draws its own crops
        self.crop = crop
        self.seed = seed
        self.palette = palette
        if kind == "depth":  # a given depth map, else one estimated from the label map
            usable = [r for r in records if r.depth is not None or r.label is not None]
        elif kind == "layout":
            usable = [r for r in records if r.label is not None]
        else:
            usable = records
        if not usable:
            raise DataError(
                f"the {kind} stage needs label maps{' or depth maps' if kind == 'depth' else ''}"
                "; none of the photos has one (data.labels=FOLDER names them)"
            )
        self.images, self.records = load_photos(usable, crop, 256)
        self.maps = None
        if kind != "edges" or any(r.edges is not None for r in self.records):
            pairs = list(zip(self.records, self.images, strict=True))
            self.maps = [
                self._map_for(record, image)
                for record, image in tqdm(pairs, desc=f"{kind} maps", unit="map")
            ]

    def _map_for(self, record: Record, image: np.ndarray) -> np.ndarray | None:
        """The record's own map at the photo's size (uint8); None where it has none."""
        h, w = image.shape[:2]
        if self.kind == "edges" or (self.kind == "depth" and record.depth is not None):
            path = record.edges if self.kind == "edges" else record.depth
            if path is None:
                return None  # edges of this photo come from Canny
            given = load_human_edges(path) if self.kind == "edges" else load_depth(path) * 255
            resized = Image.fromarray(np.asarray(given, dtype=np.uint8)).resize((w, h))
            return np.asarray(resized)
        ids = load_label_map(record.label, self.palette)
        if ids.shape != (h, w):
            ids = np.asarray(Image.fromarray(ids.astype(np.uint8)).resize((w, h), Image.NEAREST))
        if self.kind == "depth":
            return (estimate_depth_from_layout(ids, self.palette) * 255).astype(np.uint8)
        return ids.astype(np.uint8)

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = step_generator(self.seed, self.rank, step)
        picks = rng.integers(0, len(self.images), size)
        maps = []
        for index in picks:
            crop, geometry = crop_image(self.images[index], self.crop, rng)
            given = self.maps[index] if self.maps is not None else None
            if self.kind == "edges" and given is not None:  # the user's own edge map
                edges = apply_geometry(given, geometry, Image.NEAREST)
                maps.append(np.where(edges > 127, 255, 0).astype(np.uint8))
            elif self.kind == "edges":
                maps.append(canny_edges(crop, rng))
            elif self.kind == "layout":
                ids = apply_geometry(self.maps[index], geometry, Image.NEAREST)
                maps.append(random_free_regions(ids, rng, self.palette))
            else:
                depth = apply_geometry(self.maps[index], geometry, Image.BILINEAR)
                maps.append(depth.astype(np.float32) / 255.0)
        stacked = np.stack(maps)
        inputs = condition_input(self.kind, stacked, self.palette)
        if self.kind == "layout":
            return inputs, torch.as_tensor(stacked, dtype=torch.long)
        return inputs, inputs
