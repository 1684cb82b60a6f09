"""Segment photos into palette classes, and score a segmentation against a layout.

The segmenter is the data pack's DeepLabV3 + MobileNetV2 trained on ADE20K (a TFLite file run
with ai-edge-litert), the same one that made the pack's `pseudo` maps. The report uses it to ask
whether a generated image honours the layout it was painted from: segment it, then `miou`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from core.palette import Palette

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = REPO_ROOT.parent / "shared" / "models"
DEFAULT_PALETTE_SOURCES = REPO_ROOT.parent / "shared" / "data" / "palette_sources.json"
MODEL_FILE = "deeplabv3_mnv2_ade20k_default_1.tflite"
LABELS_FILE = "ade20k_labels.txt"
INPUT_SIZE = 513  # the network's fixed input side
ADE20K_CLASSES = 151  # 150 classes and "others" (id 0)


class SegmenterError(RuntimeError):
    """The segmenter's files are missing or not the expected ones; the message says where."""


def read_ade20k_labels(path: str | Path) -> list[str]:
    """ADE20K class names by id from lines `id name` (tab or spaces); id 0 is "others"."""
    path = Path(path)
    names: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not fields[0].isdigit():
            raise SegmenterError(f"{path}:{number}: expected 'id name', got {line!r}")
        names[int(fields[0])] = fields[1].strip()
    if sorted(names) != list(range(ADE20K_CLASSES)):
        raise SegmenterError(f"{path} must name the ids 0..{ADE20K_CLASSES - 1}, one per line")
    return [names[index] for index in range(ADE20K_CLASSES)]


def read_palette_sources(path: str | Path) -> dict[str, list[str]]:
    """The data pack's palette class -> the source class names that map to it."""
    path = Path(path)
    if not path.is_file():
        raise SegmenterError(
            f"{path} is missing: the ADE20K-to-palette mapping is the data pack's "
            "palette_sources.json; put the pack at ../shared/data beside the project"
        )
    sources = json.loads(path.read_text())
    if not isinstance(sources, dict) or not all(isinstance(v, list) for v in sources.values()):
        raise SegmenterError(f"{path} must map each palette class name to a list of names")
    return sources


def ade20k_to_palette(
    ade20k_names: list[str], sources: dict[str, list[str]], palette: Palette
) -> np.ndarray:
    """Lookup table ADE20K id -> palette id (151,) int64; unnamed classes map to 0 (unknown).

    Names match exactly, case included: the sources list CamVid's capitalised names ("Pole")
    apart from ADE20K's lower-case ones, and only the latter are ADE20K classes.
    """
    owner = {}
    for palette_name, names in sources.items():
        palette_id = palette.id_of(palette_name)
        for name in names:
            owner.setdefault(name, palette_id)
    return np.array([owner.get(name, 0) for name in ade20k_names], dtype=np.int64)


class Segmenter:
    """Photo (H×W×3 uint8 RGB) -> palette ids (H×W int64), through ADE20K DeepLabV3."""

    def __init__(
        self,
        models: str | Path = DEFAULT_MODELS,
        palette_sources: str | Path = DEFAULT_PALETTE_SOURCES,
        palette: Palette | None = None,
        threads: int = 1,
    ):
        models = Path(models)
        model_path, labels_path = models / MODEL_FILE, models / LABELS_FILE
        for path in (model_path, labels_path):
            if not path.is_file():
                raise SegmenterError(
                    f"{path} is missing: the layout-fidelity segmenter needs {MODEL_FILE} and "
                    f"{LABELS_FILE} in {models} (the data pack's models folder, ../shared/models "
                    "beside the project); put them there or pass their folder"
                )
        self.palette = palette or Palette.default()
        self.ade20k_names = read_ade20k_labels(labels_path)
        self.lookup = ade20k_to_palette(
            self.ade20k_names, read_palette_sources(palette_sources), self.palette
        )
        self._interpreter = _open_interpreter(model_path, threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]

    def ade20k_ids(self, image: np.ndarray) -> np.ndarray:
        """ADE20K ids (0 = others) at the image's own size: H×W int64."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 RGB image; got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        resized = Image.fromarray(image).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0  # [-1, 1]
        self._interpreter.set_tensor(self._input, pixels[None])
        self._interpreter.invoke()
        logits = self._interpreter.get_tensor(self._output)[0]  # 513, 513, 151
        ids = logits.argmax(axis=-1).astype(np.uint8)
        ids = cv2.resize(ids, (width, height), interpolation=cv2.INTER_NEAREST)
        return ids.astype(np.int64)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Palette ids (0 = unknown) of a photo: H×W int64."""
        return self.lookup[self.ade20k_ids(image)]


def _open_interpreter(model_path: Path, threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise SegmenterError(
            "the segmenter runs on the 'ai-edge-litert' package: pip install ai-edge-litert"
        ) from error
    interpreter = Interpreter(model_path=str(model_path), num_threads=threads)
    interpreter.allocate_tensors()
    expected = {
        "input": [1, INPUT_SIZE, INPUT_SIZE, 3],
        "output": [1, INPUT_SIZE, INPUT_SIZE, ADE20K_CLASSES],
    }
    found = {
        "input": list(interpreter.get_input_details()[0]["shape"]),
        "output": list(interpreter.get_output_details()[0]["shape"]),
    }
    if found != expected:
        raise SegmenterError(
            f"{model_path} has shapes {found}, expected {expected}: it is not the data pack's "
            "ADE20K DeepLabV3; restore the original file"
        )
    return interpreter


# ----------------------------------------------------------------------------- scores


@dataclass
class SegmentationScore:
    """Agreement of a predicted segmentation with a target map."""

    miou: float  # mean IoU over the scored classes (nan when none)
    pixel_accuracy: float  # share of scored pixels whose prediction equals the target
    per_class: dict[int, float]  # class id -> IoU, for each class averaged into miou
    pixels: int  # target pixels scored (not ignored)


def confusion_matrix(
    pred_ids: np.ndarray, true_ids: np.ndarray, num_classes: int, ignore: tuple[int, ...] = (0,)
) -> np.ndarray:
    """Counts [K, K + 1]: row = target class, column = predicted class, the last column a
    prediction outside 0..K-1. Target pixels in `ignore` or outside 0..K-1 (free) are dropped."""
    pred_ids, true_ids = np.asarray(pred_ids), np.asarray(true_ids)
    if pred_ids.shape != true_ids.shape:
        raise ValueError(f"maps differ in shape: {pred_ids.shape} vs {true_ids.shape}")
    true_ids = true_ids.astype(np.int64).ravel()
    pred_ids = pred_ids.astype(np.int64).ravel()
    scored = (true_ids >= 0) & (true_ids < num_classes) & ~np.isin(true_ids, ignore)
    true_ids, pred_ids = true_ids[scored], pred_ids[scored]
    pred_ids = np.where((pred_ids >= 0) & (pred_ids < num_classes), pred_ids, num_classes)
    cells = num_classes * (num_classes + 1)
    counts = np.bincount(true_ids * (num_classes + 1) + pred_ids, minlength=cells)
    return counts.reshape(num_classes, num_classes + 1)


def score_confusion(matrix: np.ndarray, ignore: tuple[int, ...] = (0,)) -> SegmentationScore:
    """mIoU and pixel accuracy from a confusion matrix (one map's or summed over many).

    IoU of class c = |pred = c and target = c| / |pred = c or target = c|, counted on scored
    pixels only. mIoU averages it over the classes not in `ignore` present in either map there.
    """
    num_classes = matrix.shape[0]
    hits = np.diagonal(matrix[:, :num_classes]).astype(np.float64)
    union = matrix.sum(axis=1) + matrix[:, :num_classes].sum(axis=0) - hits
    per_class = {
        c: float(hits[c] / union[c]) for c in range(num_classes) if union[c] > 0 and c not in ignore
    }
    total = int(matrix.sum())
    return SegmentationScore(
        miou=float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        pixel_accuracy=float(hits.sum() / total) if total else float("nan"),
        per_class=per_class,
        pixels=total,
    )


def miou(
    pred_ids: np.ndarray, true_ids: np.ndarray, num_classes: int, ignore: tuple[int, ...] = (0,)
) -> SegmentationScore:
    """Mean IoU and pixel accuracy of a predicted map against a target map of the same shape.

    Target pixels whose id is in `ignore` (unknown) or is not a class 0..num_classes-1 (free)
    are not scored; a prediction of an ignored class on a scored pixel counts as a miss.
    """
    return score_confusion(confusion_matrix(pred_ids, true_ids, num_classes, ignore), ignore)
