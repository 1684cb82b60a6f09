"""A bundle's report card: layout fidelity, edge fidelity, superresolution, Fréchet distance.

`python -m core.report --checkpoints checkpoints --out checkpoints/REPORT.md` generates from the
conditions of held-out photos (val split of the data pack) in every mode the bundle offers,
measures the results against the photos, and writes the Markdown report, the same figures as
JSON (stdout and REPORT.json beside the report) and a grid of examples. `--tiny` runs the
untrained tiny pipeline instead: it tests the plumbing, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from core.checkpoint import CheckpointError, read_checkpoint_config, read_manifest
from core.conditions import (
    canny_edges,
    downsample,
    edge_f_score,
    load_human_edges,
    resize_edges,
    upsample_bicubic,
)
from core.config import ConfigError
from core.data import DEFAULT_INDEX, DataError, load_rgb, to_tensor
from core.fid import NAME as FRECHET_NAME
from core.fid import FeatureWeightsError, Lite0Features, frechet_distance
from core.losses import PerceptualDistance, PerceptualWeightsError
from core.palette import LayoutError, ids_to_rgb, load_label_map
from core.pipeline import GenerateRequest, InputError, Pipeline, Result
from core.segmenter import (
    DEFAULT_MODELS,
    DEFAULT_PALETTE_SOURCES,
    Segmenter,
    SegmenterError,
    confusion_matrix,
    miou,
    score_confusion,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SUPERRES_FACTORS = (4, 8)
PERCEPTUAL_NAME = "perceptual distance (SqueezeNet)"
CELL = (240, 160)  # width, height of one picture in the example grid


class ReportError(ValueError):
    """The report cannot run as asked (a size the model cannot make, no usable photos)."""


# Errors a user can cause while the report runs; a caller reports them as one line.
REPORT_ERRORS = (
    ReportError,
    SegmenterError,
    FeatureWeightsError,
    PerceptualWeightsError,
    InputError,
    LayoutError,
    CheckpointError,
    ConfigError,
    DataError,
)


# ----------------------------------------------------------------------------- photos


@dataclass
class ValPhoto:
    """One held-out photo of the index and the maps it comes with."""

    photo: Path
    source: str
    label: Path | None = None  # layout from human (or the paper authors') annotations
    pseudo: Path | None = None  # layout predicted by the segmenter
    edges_human: Path | None = None  # BSDS500 annotators' mean boundary map

    @property
    def layout(self) -> Path | None:
        return self.label or self.pseudo


def read_val_photos(index: str | Path, split: str) -> list[ValPhoto]:
    """The split's rows of an index.jsonl (paths relative to its folder), in file order.

    core.data.read_index merges `label` and `pseudo`; the report keeps them apart because human
    and predicted layouts are scored separately.
    """
    index = Path(index)
    if not index.is_file():
        raise ReportError(f"index {index} does not exist; point --index at the data pack's")
    photos = []
    for line in index.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("split") != split:
            continue
        paths = {k: index.parent / row[k] if row.get(k) else None for k in ("label", "pseudo")}
        edges = row.get("edges_human")
        photos.append(
            ValPhoto(
                photo=index.parent / row["photo"],
                source=row.get("source", "index"),
                edges_human=index.parent / edges if edges else None,
                **paths,
            )
        )
    if not photos:
        raise ReportError(f"{index} has no photos in split '{split}'")
    return photos


def by_source_in_turn(photos: Iterable[ValPhoto]) -> list[ValPhoto]:
    """Interleave sources (first photo of each, then the second, ...) so a short prefix of the
    list samples every source instead of the index's first one."""
    queues: dict[str, list[ValPhoto]] = {}
    for photo in photos:
        queues.setdefault(photo.source, []).append(photo)
    mixed = []
    for turn in range(max((len(q) for q in queues.values()), default=0)):
        mixed += [queue[turn] for queue in queues.values() if turn < len(queue)]
    return mixed


def fit_height(image: np.ndarray, height: int, factor: int, max_width: int) -> np.ndarray:
    """Resize to `height`, keeping the aspect with the width rounded to a multiple of factor."""
    width = round(image.shape[1] * height / image.shape[0] / factor) * factor
    width = int(min(max(width, factor), max_width))
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


def resize_ids(ids: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of an id map to width × height."""
    resized = cv2.resize(ids.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return resized.astype(np.int64)


def scaled_human_edges(path: Path, width: int, height: int) -> np.ndarray:
    """BSDS500 human edges (thinned at their own size), scaled to width × height and thinned
    again: area scaling keeps every line (a nearest-neighbour resize would break thin ones)."""
    return resize_edges(load_human_edges(path), width, height)


# ----------------------------------------------------------------------------- generation


@dataclass
class ReportSettings:
    height: int = 256  # every photo is scaled to this height, keeping its aspect
    limit: int = 24  # photos per measure (per group for layouts)
    superres_limit: int = 8
    bsds_limit: int = 8
    seed: int = 0  # photo i is generated with seed + i
    temperature: float = 1.0
    top_k: int | None = 100
    guidance: float = GenerateRequest.guidance  # the studio's default (layout and sketch)
    prior: float = GenerateRequest.prior  # the class prior's weight (layout, where bundled)
    compose: bool = False  # layouts, sketches, free: compose at photo scale, then enlarge
    painted_limit: int = 4  # painted lake layouts per size, each sampled direct and composed


@dataclass
class Example:
    """One row of the example grid."""

    title: str
    condition: np.ndarray  # the condition as a picture
    output: np.ndarray
    real: np.ndarray | None


@dataclass
class Section:
    """What a measure hands back: figures for JSON, examples for the grid."""

    figures: dict
    examples: list[Example] = field(default_factory=list)


class ImageGenerator:
    """Calls the pipeline with the report's sampling settings; one image per request."""

    def __init__(self, pipeline: Pipeline, settings: ReportSettings):
        self.pipeline = pipeline
        self.settings = settings
        self.count = 0
        self.seconds = 0.0
        self.last: Result | None = None  # the last request's whole result

    def __call__(
        self, mode: str, image_size: tuple[int, int], condition, seed_offset: int, **options
    ):
        """The generated H×W×3 uint8 image; image_size is (height, width)."""
        height, width = image_size
        request = GenerateRequest(
            mode=mode,
            width=width,
            height=height,
            condition=condition,
            seed=self.settings.seed + seed_offset,
            temperature=self.settings.temperature,
            guidance=self.settings.guidance,
            prior=self.settings.prior,
            top_k=self.settings.top_k,
            **{"compose": self.settings.compose and mode != "superres", **options},
        )
        started = time.monotonic()
        result = None
        for event in self.pipeline.generate(request):
            if isinstance(event, Result):
                result = event
        self.seconds += time.monotonic() - started
        self.count += 1
        self.last = result
        return result.images[0]

    def offers(self, task: str) -> bool:
        return task in self.pipeline.vocabulary.tasks()


def _progress(total: int, description: str) -> tqdm:
    return tqdm(total=total, desc=description, unit="image", file=sys.stderr, leave=False)


def _load_fitted(photo: ValPhoto, settings: ReportSettings, factor: int) -> np.ndarray | None:
    try:
        image = load_rgb(photo.photo)
    except DataError as error:
        logger.warning("skipping %s", error)
        return None
    return fit_height(image, settings.height, factor, max_width=2 * settings.height)


# ----------------------------------------------------------------------------- measures


def layout_groups(photos: list[ValPhoto], skip: int = 0) -> dict[str, list[ValPhoto]]:
    """Photos with human-labelled and with pseudo-labelled layouts, each after the first skip."""
    return {
        "human": [p for p in photos if p.label is not None][skip:],
        "pseudo": [p for p in photos if p.label is None and p.pseudo is not None][skip:],
    }


def measure_layouts(
    generate: ImageGenerator,
    segmenter: Segmenter,
    groups: dict[str, list[ValPhoto]],
    settings: ReportSettings,
) -> tuple[Section, dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """Generate from each photo's layout; segment generated and real images; mIoU vs layout.

    Returns the section and, per group, the (generated, real) pairs for the Fréchet distance.
    """
    palette = generate.pipeline.palette
    num_classes = palette.num_classes
    figures, examples, pairs = {}, [], {}
    for group, photos in groups.items():
        generated_counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        real_counts = np.zeros_like(generated_counts)
        per_image_generated, per_image_real, pairs[group], sources = [], [], [], set()
        bar = _progress(min(settings.limit, len(photos)), f"layout ({group})")
        for photo in photos:
            if len(pairs[group]) >= settings.limit:
                break
            image = _load_fitted(photo, settings, generate.pipeline.factor)
            if image is None:
                continue
            height, width = image.shape[:2]
            layout = resize_ids(load_label_map(photo.layout, palette), width, height)
            if not ((layout > 0) & (layout < palette.free_id)).any():
                logger.info("skipping %s: its layout paints no class", photo.photo.name)
                continue
            output = generate("layout", (height, width), layout, len(pairs[group]))
            generated_ids, real_ids = segmenter(output), segmenter(image)
            generated_counts += confusion_matrix(generated_ids, layout, num_classes)
            real_counts += confusion_matrix(real_ids, layout, num_classes)
            per_image_generated.append(miou(generated_ids, layout, num_classes).miou)
            per_image_real.append(miou(real_ids, layout, num_classes).miou)
            pairs[group].append((output, image))
            sources.add(photo.source)
            if len(pairs[group]) == 1:
                colours = ids_to_rgb(layout, palette)
                examples.append(Example(f"layout ({group})", colours, output, image))
            bar.update(1)
        bar.close()
        figures[group] = _layout_figures(
            generated_counts, real_counts, per_image_generated, per_image_real, palette.names
        )
        figures[group]["sources"] = sorted(sources)
    return Section(figures, examples), pairs


def _layout_figures(
    generated_counts, real_counts, per_image_generated, per_image_real, names
) -> dict:
    generated, real = score_confusion(generated_counts), score_confusion(real_counts)
    ratio = generated.miou / real.miou if real.miou > 0 else float("nan")
    painted = generated_counts.sum(axis=1)  # layout pixels per class
    return {
        # per class the layouts paint: its pixels, and IoU of the generated and the real images
        "classes": {
            names[c]: {
                "pixels": int(painted[c]),
                "iou_generated": generated.per_class.get(c, 0.0),
                "iou_real": real.per_class.get(c, 0.0),
            }
            for c in range(1, len(painted))
            if painted[c] > 0
        },
        "photos": len(per_image_generated),
        "miou_generated": generated.miou,
        "miou_real": real.miou,
        "miou_ratio": ratio,
        "pixel_accuracy_generated": generated.pixel_accuracy,
        "pixel_accuracy_real": real.pixel_accuracy,
        "mean_image_miou_generated": _mean(per_image_generated),
        "mean_image_miou_real": _mean(per_image_real),
    }


PAINTED_SIZES = ((512, 512), (1280, 832))  # width, height: the studio's presets
PAINTED_CLASSES = ("sky", "mountain", "water", "grass")


def painted_layout(width: int, height: int, rng: np.random.Generator, palette) -> np.ndarray:
    """A lake layout as people paint one: sky over a mountain range, a lake, grass in front,
    with wavy borders drawn from rng (ids H × W)."""
    x = np.linspace(0.0, 1.0, width)

    def wave(level: float, amplitude: float, count: int) -> np.ndarray:
        frequencies = rng.uniform(1.0, 5.0, count)
        phases = rng.uniform(0.0, 2 * np.pi, count)
        waves = np.sin(2 * np.pi * frequencies[:, None] * x + phases[:, None]).mean(axis=0)
        return level + amplitude * waves

    lake = rng.uniform(0.45, 0.58)
    ridge = wave(lake - rng.uniform(0.12, 0.22), rng.uniform(0.04, 0.1), 3)
    shore = wave(rng.uniform(0.7, 0.82), 0.04, 2)
    rows = np.broadcast_to((np.arange(height)[:, None] + 0.5) / height, (height, width))
    ids = np.full((height, width), palette.id_of("sky"), dtype=np.int64)
    ids[rows >= ridge] = palette.id_of("mountain")
    ids[rows >= lake] = palette.id_of("water")
    ids[rows >= shore] = palette.id_of("grass")
    return ids


def measure_painted(
    generate: ImageGenerator, segmenter: Segmenter, settings: ReportSettings
) -> Section:
    """Painted lake layouts at the studio's sizes, sampled directly and, where the studio
    composes that size, composed: the segmenter's classes on the result against the painting
    (no photo, so no ceiling)."""
    palette = generate.pipeline.palette
    num_classes = palette.num_classes
    figures, examples = {"layouts": settings.painted_limit}, []
    ways = {}  # size -> (way, compose) pairs: composed too where the studio composes
    for width, height in PAINTED_SIZES:
        probe = GenerateRequest("layout", width, height, compose=True)
        composes = generate.pipeline.compose_plan(probe) is not None
        ways[width, height] = (("direct", False), ("composed", True))[: 1 + composes]
    total = settings.painted_limit * sum(len(pairs) for pairs in ways.values())
    bar = _progress(total, "painted layouts")
    for width, height in PAINTED_SIZES:
        rng = np.random.default_rng(settings.seed)
        count = settings.painted_limit
        layouts = [painted_layout(width, height, rng, palette) for _ in range(count)]
        by_way = {}
        for way, compose in ways[width, height]:
            counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
            for index, layout in enumerate(layouts):
                output = generate("layout", (height, width), layout, index, compose=compose)
                counts += confusion_matrix(segmenter(output), layout, num_classes)
                if index == 0:
                    title = f"painted {width}, {way}"  # fits the label column
                    examples.append(Example(title, ids_to_rgb(layout, palette), output, None))
                bar.update(1)
            score = score_confusion(counts)
            painted = [score.per_class.get(palette.id_of(name), 0.0) for name in PAINTED_CLASSES]
            by_way[way] = {
                "miou_painted_classes": float(np.mean(painted)),
                "miou": score.miou,
                "pixel_accuracy": score.pixel_accuracy,
                "class_iou": {palette.names[k]: v for k, v in score.per_class.items()},
            }
        figures[f"{width}x{height}"] = by_way
    bar.close()
    return Section(figures, examples)


def measure_edges(
    generate: ImageGenerator, photos: list[ValPhoto], settings: ReportSettings
) -> Section:
    """Sketch mode from Canny edges of photos, and from BSDS500 human edges where present."""
    figures, examples = {}, []
    scores = []
    bar = _progress(min(settings.limit, len(photos)), "sketch (Canny)")
    for photo in photos:
        if len(scores) >= settings.limit:
            break
        image = _load_fitted(photo, settings, generate.pipeline.factor)
        if image is None:
            continue
        edges = canny_edges(image)
        if not edges.any():
            continue  # a featureless photo: nothing to sketch from
        output = generate("sketch", image.shape[:2], edges, len(scores))
        scores.append(edge_f_score(canny_edges(output), edges))
        if not examples:
            examples.append(Example("sketch (Canny)", _edges_picture(edges), output, image))
        bar.update(1)
    bar.close()
    figures["canny"] = {"photos": len(scores), "f_score": _mean(scores)}

    human = [p for p in photos if p.edges_human is not None][: settings.bsds_limit]
    generated_scores, real_scores = [], []
    bar = _progress(len(human), "sketch (BSDS500 human edges)")
    for photo in human:
        image = _load_fitted(photo, settings, generate.pipeline.factor)
        if image is None:
            continue
        height, width = image.shape[:2]
        edges = scaled_human_edges(photo.edges_human, width, height)
        output = generate("sketch", (height, width), edges, len(generated_scores))
        generated_scores.append(edge_f_score(canny_edges(output), edges))
        real_scores.append(edge_f_score(canny_edges(image), edges))
        if len(generated_scores) == 1:
            examples.append(Example("sketch (BSDS500)", _edges_picture(edges), output, image))
        bar.update(1)
    bar.close()
    figures["bsds_human"] = {
        "photos": len(generated_scores),
        "f_score_generated": _mean(generated_scores),
        "f_score_real_photo": _mean(real_scores),
    }
    return Section(figures, examples)


def _edges_picture(edges: np.ndarray) -> np.ndarray:
    """Dark lines on white paper, as a user would draw them."""
    return np.repeat((255 - edges)[..., None], 3, axis=2)


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images (core.evaluate uses this one too)."""
    error = np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * math.log10(255.0**2 / error))


def measure_superres(
    generate: ImageGenerator,
    photos: list[ValPhoto],
    settings: ReportSettings,
    perceptual: PerceptualDistance,
) -> Section:
    """×4 and ×8 from Lanczos thumbnails of photos: PSNR and perceptual distance vs the photo,
    beside bicubic upsampling of the same thumbnail."""
    figures, examples = {}, []
    factors = [f for f in SUPERRES_FACTORS if generate.offers(f"superres{f}")]
    for factor in SUPERRES_FACTORS:
        if factor not in factors:
            figures[f"x{factor}"] = {"skipped": f"the model was not trained for superres{factor}"}
    for factor in factors:
        scores: dict[str, list[float]] = {k: [] for k in ("psnr", "perceptual")}
        bicubic_scores: dict[str, list[float]] = {k: [] for k in ("psnr", "perceptual")}
        decoded_scores: dict[str, list[float]] = {k: [] for k in ("psnr", "perceptual")}
        bar = _progress(min(settings.superres_limit, len(photos)), f"superres ×{factor}")
        for photo in photos:
            if len(scores["psnr"]) >= settings.superres_limit:
                break
            image = _load_fitted(photo, settings, generate.pipeline.factor)
            if image is None:
                continue
            height, width = (side // factor * factor for side in image.shape[:2])
            image = np.ascontiguousarray(image[:height, :width])
            small = downsample(image, factor)
            output = generate(
                "superres", image.shape[:2], small, len(scores["psnr"]), superres_factor=factor
            )
            bicubic = upsample_bicubic(small, (width, height))
            decoded = generate.last.extra.get("decoded", [output])[0]
            compared = ((output, scores), (bicubic, bicubic_scores), (decoded, decoded_scores))
            for result, store in compared:
                store["psnr"].append(psnr(image, result))
                with torch.no_grad():
                    distance = perceptual(to_tensor([result]), to_tensor([image]))
                store["perceptual"].append(float(distance[0]))
            if len(scores["psnr"]) == 1:
                blocky = cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)
                examples.append(Example(f"superres x{factor}", blocky, output, image))
            bar.update(1)
        bar.close()
        figures[f"x{factor}"] = {
            "photos": len(scores["psnr"]),
            "psnr_db": _mean(scores["psnr"]),
            "perceptual_squeezenet": _mean(scores["perceptual"]),
            "bicubic_psnr_db": _mean(bicubic_scores["psnr"]),
            "bicubic_perceptual_squeezenet": _mean(bicubic_scores["perceptual"]),
            "decoded_psnr_db": _mean(decoded_scores["psnr"]),
            "decoded_perceptual_squeezenet": _mean(decoded_scores["perceptual"]),
        }
    return Section(figures, examples)


def measure_frechet(
    generate: ImageGenerator,
    extractor: Lite0Features,
    reals: list[np.ndarray],
    layout_samples: list[np.ndarray],
    other_reals: list[np.ndarray],
) -> Section:
    """Fréchet distances to the real photos: free samples of the same sizes, layout samples,
    and, as the floor at this set size, as many other real photos."""
    figures: dict = {"images_per_set": len(reals)}
    if len(reals) < 2:
        keys = ("free_vs_real", "layout_vs_real", "other_real_vs_real")
        return Section({**figures, **dict.fromkeys(keys)})  # a covariance needs 2 images
    real_features = extractor.features(reals)
    examples = []
    if generate.offers("free"):
        free, bar = [], _progress(len(reals), "free")
        for number, image in enumerate(reals):
            free.append(generate("free", image.shape[:2], None, number))
            bar.update(1)
        bar.close()
        figures["free_vs_real"] = frechet_distance(extractor.features(free), real_features)
        grey = np.full_like(free[0], 200)
        examples.append(Example("free", grey, free[0], None))
    else:
        figures["free_vs_real"] = None
    if len(layout_samples) == len(reals):
        layout_features = extractor.features(layout_samples)
        figures["layout_vs_real"] = frechet_distance(layout_features, real_features)
    else:
        figures["layout_vs_real"] = None
    if len(other_reals) == len(reals):
        other_features = extractor.features(other_reals)
        figures["other_real_vs_real"] = frechet_distance(other_features, real_features)
    else:
        figures["other_real_vs_real"] = None
    return Section(figures, examples)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


# ----------------------------------------------------------------------------- the report


def _interleave(first: list, second: list) -> list:
    mixed = []
    for index in range(max(len(first), len(second))):
        mixed += [items[index] for items in (first, second) if index < len(items)]
    return mixed


def _frechet_sets(
    pairs: dict[str, list], photos: list[ValPhoto], settings: ReportSettings, factor: int
):
    """Real photos, layout samples of them, and other real photos, `limit` of each.

    The layout measure's photos serve (human and pseudo layouts in turn), so the layout samples
    need no extra generation; the layout photos past the limit are the other real photos.
    """
    chosen = _interleave(pairs.get("human", []), pairs.get("pseudo", []))
    if len(chosen) >= 2:
        picked, rest = chosen[: settings.limit], chosen[settings.limit :]
        others = [real for _, real in rest][: len(picked)]
        return [real for _, real in picked], [output for output, _ in picked], others
    loaded = (_load_fitted(photo, settings, factor) for photo in photos)  # no layout mode
    images = []
    for image in loaded:
        if image is not None:
            images.append(image)
        if len(images) == 2 * settings.limit:
            break
    return images[: settings.limit], [], images[settings.limit :]


def run_report(
    pipeline: Pipeline,
    index: str | Path,
    split: str,
    settings: ReportSettings,
    models: str | Path = DEFAULT_MODELS,
    palette_sources: str | Path = DEFAULT_PALETTE_SOURCES,
) -> tuple[dict, list[Example]]:
    """Every measure the pipeline's modes allow, as a JSON-ready dict, and the examples."""
    if settings.height % pipeline.factor:
        raise ReportError(
            f"--size {settings.height} is not a multiple of the model's token size "
            f"{pipeline.factor}; use e.g. {settings.height // pipeline.factor * pipeline.factor}"
        )
    photos = by_source_in_turn(read_val_photos(index, split))
    generate = ImageGenerator(pipeline, settings)
    offers_superres = any(generate.offers(f"superres{f}") for f in SUPERRES_FACTORS)
    # the measuring networks load first, so a missing one stops the report before it samples
    extractor = Lite0Features()
    perceptual = PerceptualDistance() if offers_superres else None
    segmenter = None
    if generate.offers("layout"):
        segmenter = Segmenter(models, palette_sources, pipeline.palette, torch.get_num_threads())
    report: dict = {}
    examples: list[Example] = []

    pairs: dict[str, list] = {}
    if segmenter is not None:
        section, pairs = measure_layouts(generate, segmenter, layout_groups(photos), settings)
        report["layout"] = section.figures
        examples += section.examples
    else:
        report["layout"] = {"skipped": "the model was not trained for layouts"}
    if segmenter is not None and settings.painted_limit > 0:
        section = measure_painted(generate, segmenter, settings)
        report["painted"] = section.figures
        examples += section.examples

    if generate.offers("edges"):
        section = measure_edges(generate, photos, settings)
        report["edges"] = section.figures
        examples += section.examples
    else:
        report["edges"] = {"skipped": "the model was not trained for sketches"}

    if perceptual is not None:
        section = measure_superres(generate, photos, settings, perceptual)
        report["superres"] = section.figures
        examples += section.examples
    else:
        report["superres"] = {"skipped": "the model was not trained for superresolution"}

    reals, layout_samples, others = _frechet_sets(pairs, photos, settings, pipeline.factor)
    section = measure_frechet(generate, extractor, reals, layout_samples, others)
    report["frechet"] = section.figures
    examples += section.examples

    report["generation"] = {
        "images": generate.count,
        "seconds": generate.seconds,
        "seconds_per_image": generate.seconds / max(generate.count, 1),
    }
    return report, examples


def transformer_figures(bundle: str | Path) -> dict | None:
    """Validation NLL and the unigram baseline recorded in the bundle's transformer."""
    try:
        folder = Path(bundle) / read_manifest(bundle)["transformer"]["folder"]
        extra = read_checkpoint_config(folder).get("extra") or {}
    except (CheckpointError, KeyError) as error:
        logger.warning("no transformer figures: %s", error)
        return None
    return {
        "val_bits": extra.get("val_bits"),
        "unigram_bits": extra.get("unigram_bits"),
        "step": extra.get("step"),
    }


# ----------------------------------------------------------------------------- writing


def example_grid(examples: list[Example]) -> Image.Image:
    """Rows of input | output | real, each picture letterboxed into one cell."""
    label_width, header = 130, 24
    columns = ("input", "output", "real")
    width = label_width + len(columns) * CELL[0]
    grid = Image.new("RGB", (width, header + len(examples) * CELL[1]), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(columns):
        draw.text((label_width + column * CELL[0] + 8, 6), title, fill="black")
    for row, example in enumerate(examples):
        top = header + row * CELL[1]
        draw.text((6, top + CELL[1] // 2 - 6), example.title, fill="black")
        for column, picture in enumerate((example.condition, example.output, example.real)):
            if picture is not None:
                grid.paste(_letterbox(picture), (label_width + column * CELL[0], top))
    return grid


def _letterbox(picture: np.ndarray, margin: int = 3) -> Image.Image:
    """The picture scaled to fit one cell (inside a white margin), centred."""
    image = Image.fromarray(picture)
    inner = CELL[0] - 2 * margin, CELL[1] - 2 * margin
    scale = min(inner[0] / image.width, inner[1] / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    cell = Image.new("RGB", CELL, "white")
    offset = (CELL[0] - size[0]) // 2, (CELL[1] - size[1]) // 2
    cell.paste(image.resize(size, Image.Resampling.LANCZOS), offset)
    return cell


def _text(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_report(report: dict, grid_name: str | None) -> str:
    """The report as Markdown: what was measured, how, and the figures."""
    settings = report["settings"]
    lines = [
        f"# Report: {report['model']['name']}",
        "",
        f"- command: `{report['command_line']}`",
        f"- took {report['seconds'] / 60:.1f} min; {report['generation']['images']} images "
        f"generated, {report['generation']['seconds_per_image']:.1f} s each",
        f"- model: `{report['model']['folder']}` (id {report['model']['identity']}), modes "
        f"{', '.join(report['model']['modes'])}",
        f"- photos: split `{settings['split']}` of `{settings['index']}`, scaled to "
        f"{settings['height']} px high (aspect kept, width a multiple of the token size); "
        f"sources taken in turn; seed {settings['seed']} + photo number, temperature "
        f"{settings['temperature']}, top-k {settings['top_k']}, guidance "
        f"{settings.get('guidance', 1.0)} (layout and sketch), class prior "
        f"{settings.get('prior', 0.0)} (layout)"
        + (
            "; composed at photo scale, then enlarged (pictures over 640 px high)"
            if settings.get("compose")
            else ""
        ),
    ]
    if report["model"]["tiny"]:
        lines += ["", "**Untrained tiny pipeline (`--tiny`): the numbers test the plumbing only.**"]
    lines += _model_lines(report.get("transformer"), report.get("vqgan"))
    lines += _layout_lines(report["layout"])
    if "painted" in report:
        lines += _painted_lines(report["painted"])
    lines += _edge_lines(report["edges"])
    lines += _superres_lines(report["superres"])
    lines += _frechet_lines(report["frechet"])
    if grid_name:
        lines += ["", "## Examples", "", f"![input, output, real per mode]({grid_name})"]
    return "\n".join(lines) + "\n"


def _model_lines(transformer: dict | None, vqgan: dict | None) -> list[str]:
    lines = ["", "## Models", ""]
    if transformer and transformer.get("val_bits") is not None:
        val, unigram = transformer["val_bits"], transformer.get("unigram_bits")
        gain = f" ({1 - val / unigram:.1%} below it)" if unigram else ""
        lines.append(
            f"- transformer: validation NLL {_text(val)} bits per image token after "
            f"{_text(transformer.get('step'))} steps; unigram baseline {_text(unigram)}{gain}"
        )
    else:
        lines.append("- transformer: no validation NLL recorded")
    if vqgan and isinstance(vqgan.get("vqgan"), dict):
        ours = vqgan["vqgan"]
        lines.append(
            f"- image VQGAN ({vqgan.get('data', {}).get('photos', '?')} photos, "
            f"{vqgan.get('data', {}).get('size', '?')} px squares): PSNR "
            f"{_text(ours.get('psnr_db'), 2)} dB, {PERCEPTUAL_NAME} "
            f"{_text(ours.get('perceptual_squeezenet'), 4)}, codebook usage "
            f"{_text(ours.get('codebook_usage'), 3)}, perplexity {_text(ours.get('perplexity'), 1)}"
        )
        for key, name in (("bicubic_thumbnail", "bicubic thumbnail"), ("jpeg_quality_1", "JPEG")):
            if isinstance(vqgan.get(key), dict):
                other = vqgan[key]
                lines.append(
                    f"  - {name}: PSNR {_text(other.get('psnr_db'), 2)} dB, perceptual "
                    f"{_text(other.get('perceptual_squeezenet'), 4)}, "
                    f"{_text(other.get('bits_per_pixel'), 3)} bits per pixel"
                )
    else:
        lines.append("- image VQGAN: not measured here (`--vqgan-json` from core.evaluate vqgan)")
    return lines


def _layout_lines(layout: dict) -> list[str]:
    lines = ["", "## Layout fidelity", ""]
    if "skipped" in layout:
        return lines + [f"Skipped: {layout['skipped']}."]
    lines += [
        "Each photo's layout generates an image; the ADE20K DeepLabV3 segmenter (mapped to the "
        "palette) segments the generated image and the real photo, both compared with the "
        "layout. mIoU: IoU per palette class summed over all photos' pixels, averaged over the "
        "classes present; unknown and free layout pixels are not scored. The real photo's "
        "mIoU is the ceiling this measure can show; the ratio is generated / real. "
        "Human-labelled means the source's annotations (for S-FLCKR, the paper authors' "
        "DeepLab maps). Pseudo layouts were made by this same segmenter (from the full-size "
        "photo), so their ceiling is inflated.",
        "",
        "| layouts | photos | mIoU generated | mIoU real (ceiling) | ratio | pixel acc. "
        "generated | pixel acc. real | sources |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group, name in (("human", "human-labelled"), ("pseudo", "pseudo-labelled")):
        row = layout.get(group, {})
        lines.append(
            f"| {name} | {row.get('photos', 0)} | {_text(row.get('miou_generated'))} | "
            f"{_text(row.get('miou_real'))} | {_text(row.get('miou_ratio'), 2)} | "
            f"{_text(row.get('pixel_accuracy_generated'))} | "
            f"{_text(row.get('pixel_accuracy_real'))} | {', '.join(row.get('sources', []))} |"
        )
    return lines + _class_lines(layout)


def _class_lines(layout: dict) -> list[str]:
    """IoU per class the layouts paint, generated and real, for each group."""
    groups = [g for g in ("human", "pseudo") if layout.get(g, {}).get("classes")]
    if not groups:
        return []
    names = list(dict.fromkeys(n for g in groups for n in layout[g]["classes"]))
    lines = [
        "",
        "IoU per painted class (share of the group's scored layout pixels in brackets), "
        "generated / real:",
        "",
        "| class | " + " | ".join(f"{g}-labelled" for g in groups) + " |",
        "|---" * (len(groups) + 1) + "|",
    ]
    for name in names:
        cells = []
        for group in groups:
            classes = layout[group]["classes"]
            if name not in classes:
                cells.append("")
                continue
            entry = classes[name]
            share = entry["pixels"] / sum(c["pixels"] for c in classes.values())
            cells.append(
                f"{_text(entry['iou_generated'], 2)} / {_text(entry['iou_real'], 2)} ({share:.0%})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _painted_lines(painted: dict) -> list[str]:
    lines = [
        "",
        "## Painted layouts",
        "",
        f"{painted['layouts']} lake layouts as people paint them (sky, a mountain range, a lake, "
        "grass in front, wavy borders; `core.report.painted_layout`), each sampled at the "
        "studio's two presets: directly, and at 1280×832 also composed as the studio does by "
        "default (at photo scale, then enlarged with superres). The segmenter's classes on the "
        "result against the painting: IoU of each painted class, their mean, and the mIoU over "
        "every class found in either map (as above, so a class the segmenter sees that was not "
        "painted counts as 0); there is no photo, so no ceiling.",
        "",
        "| size | way | mean IoU, painted classes | mIoU, all | pixel acc. | "
        + " | ".join(PAINTED_CLASSES)
        + " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, ways in painted.items():
        if size == "layouts":
            continue
        for way, row in ways.items():
            iou = row.get("class_iou", {})
            classes = " | ".join(_text(iou.get(name)) for name in PAINTED_CLASSES)
            lines.append(
                f"| {size.replace('x', '×')} | {way} | {_text(row['miou_painted_classes'])} | "
                f"{_text(row['miou'])} | {_text(row['pixel_accuracy'])} | {classes} |"
            )
    return lines


def _edge_lines(edges: dict) -> list[str]:
    lines = ["", "## Edges (sketch mode)", ""]
    if "skipped" in edges:
        return lines + [f"Skipped: {edges['skipped']}."]
    canny, human = edges["canny"], edges["bsds_human"]
    lines += [
        "F-score (2 px tolerance) of the Canny edges of the generated image against the edges "
        "it was generated from.",
        "",
        f"- Canny edges of val photos: F = {_text(canny['f_score'])} ({canny['photos']} photos)",
        f"- BSDS500 human edges: F = {_text(human['f_score_generated'])} "
        f"({human['photos']} photos); the real photo's Canny edges score "
        f"{_text(human['f_score_real_photo'])} against the same human edges",
    ]
    return lines


def _superres_lines(superres: dict) -> list[str]:
    lines = ["", "## Superresolution", ""]
    if "skipped" in superres:
        return lines + [f"Skipped: {superres['skipped']}."]
    lines += [
        f"The photo's Lanczos thumbnail (1/4 or 1/8) is enlarged back; PSNR and {PERCEPTUAL_NAME} "
        "(lower is closer) against the photo, beside bicubic enlargement of the same thumbnail. "
        "The studio's result is the transformer's tokens, decoded, then back-projected onto "
        "the thumbnail (`core.conditions.back_project`); the decoded tokens alone are shown "
        "too.",
        "",
        "| factor | photos | PSNR (dB) | perceptual | bicubic PSNR | bicubic perceptual "
        "| decoded PSNR | decoded perceptual |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in superres.items():
        if "skipped" in row:
            lines.append(f"| {key} | — | skipped: {row['skipped']} | | | | | |")
            continue
        lines.append(
            f"| {key} | {row['photos']} | {_text(row['psnr_db'], 2)} | "
            f"{_text(row['perceptual_squeezenet'], 4)} | {_text(row['bicubic_psnr_db'], 2)} | "
            f"{_text(row['bicubic_perceptual_squeezenet'], 4)} | "
            f"{_text(row.get('decoded_psnr_db'), 2)} | "
            f"{_text(row.get('decoded_perceptual_squeezenet'), 4)} |"
        )
    return lines


def _frechet_lines(frechet: dict) -> list[str]:
    count = frechet["images_per_set"]
    return [
        "",
        f"## {FRECHET_NAME}",
        "",
        f"Between sets of {count} images and the same {count} real photos (lower is closer). "
        "With sets this small the values depend on the set size: compare them only with each "
        "other and with reports of the same --limit. Other real photos give the floor.",
        "",
        f"- free samples (same sizes as the photos): {_text(frechet['free_vs_real'], 1)}",
        f"- layout samples: {_text(frechet['layout_vs_real'], 1)}",
        f"- other real val photos (floor): {_text(frechet['other_real_vs_real'], 1)}",
    ]


def _json_safe(value):
    """NaN and infinities become null (JSON has no such numbers); floats are rounded."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return round(value, 5) if math.isfinite(value) else None
    return value


# ----------------------------------------------------------------------------- command line


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `python -m core.report` and the evaluate subcommand."""
    parser.add_argument("--checkpoints", default="checkpoints", help="bundle folder to measure")
    parser.add_argument("--tiny", action="store_true", help="untrained tiny pipeline (plumbing)")
    parser.add_argument("--index", default=str(DEFAULT_INDEX), help="the data pack's index.jsonl")
    parser.add_argument("--split", default="val", help="split of the index to use")
    parser.add_argument("--limit", type=int, default=24, help="photos per measure (per group)")
    parser.add_argument("--superres-limit", type=int, default=8, help="photos per factor")
    parser.add_argument("--bsds-limit", type=int, default=8, help="photos with human edges")
    parser.add_argument("--size", type=int, default=256, help="height of every image, in px")
    parser.add_argument("--seed", type=int, default=0, help="photo i is sampled with seed + i")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=100, help="0 for no top-k")
    parser.add_argument(
        "--guidance",
        type=float,
        default=GenerateRequest.guidance,
        help="layout and sketch guidance (1 = plain sampling; default: the studio's)",
    )
    parser.add_argument(
        "--prior",
        type=float,
        default=GenerateRequest.prior,
        help="layout class prior weight (0 = off; default: the studio's)",
    )
    parser.add_argument(
        "--painted-limit",
        type=int,
        default=4,
        help="painted lake layouts per studio preset size (0: skip)",
    )
    parser.add_argument(
        "--compose",
        action="store_true",
        help="compose pictures over 640 px high at photo scale, then enlarge (the studio's way)",
    )
    parser.add_argument("--models", default=str(DEFAULT_MODELS), help="segmenter folder")
    parser.add_argument("--palette-sources", default=str(DEFAULT_PALETTE_SOURCES))
    parser.add_argument("--vqgan-json", help="JSON from `python -m core.evaluate vqgan --out`")


def evaluate_bundle(args: argparse.Namespace) -> dict:
    """Run the report for parsed arguments; write Markdown, JSON and grid if args.markdown."""
    started = time.monotonic()
    settings = ReportSettings(
        height=args.size,
        limit=args.limit,
        superres_limit=args.superres_limit,
        bsds_limit=args.bsds_limit,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k or None,
        guidance=args.guidance,
        prior=args.prior,
        compose=args.compose,
        painted_limit=args.painted_limit,
    )
    pipeline = Pipeline.tiny() if args.tiny else Pipeline.load(args.checkpoints)
    figures, examples = run_report(
        pipeline, args.index, args.split, settings, args.models, args.palette_sources
    )
    command_line = getattr(args, "command_line", None)
    if command_line is None:
        command_line = "python -m core.evaluate " + shlex.join(sys.argv[1:])
    report = {
        "command": "bundle",
        "command_line": command_line,
        "seconds": time.monotonic() - started,
        "model": {
            "name": pipeline.name,
            "identity": pipeline.identity,
            "folder": "(tiny)" if args.tiny else str(args.checkpoints),
            "modes": list(pipeline.modes),
            "tiny": bool(args.tiny),
        },
        "settings": {"index": str(args.index), "split": args.split, **vars(settings)},
        "transformer": None if args.tiny else transformer_figures(args.checkpoints),
        "vqgan": json.loads(Path(args.vqgan_json).read_text()) if args.vqgan_json else None,
        "names": {"frechet": FRECHET_NAME, "perceptual": PERCEPTUAL_NAME},
        **figures,
    }
    report = _json_safe(report)
    if args.markdown:
        markdown = Path(args.markdown)
        markdown.parent.mkdir(parents=True, exist_ok=True)
        grid_name = None
        if examples:
            grid_path = markdown.with_name(f"{markdown.stem.lower()}_examples.png")
            example_grid(examples).save(grid_path)
            grid_name = grid_path.name
            report["examples"] = grid_name
        markdown.write_text(markdown_report(report, grid_name))
        markdown.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s and %s", markdown, markdown.with_suffix(".json"))
    return report


def add_bundle_command(subparsers, common: argparse.ArgumentParser) -> None:
    """Register `python -m core.evaluate bundle` (core.evaluate's COMMANDS hook)."""
    parser = subparsers.add_parser(
        "bundle",
        parents=[common],
        help="a whole bundle: layout fidelity, edges, superres, Fréchet distance",
        description="Generate from held-out photos' conditions in every mode of a bundle and "
        "measure the results (the report of python -m core.report).",
    )
    add_report_arguments(parser)
    parser.add_argument("--markdown", help="also write the Markdown report (grid, JSON beside)")
    parser.set_defaults(evaluate=evaluate_bundle)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.report",
        description="Measure a bundle on held-out photos; writes a Markdown report, its JSON "
        "and an example grid, and prints the JSON.",
    )
    add_report_arguments(parser)
    parser.add_argument(
        "--out", dest="markdown", default="checkpoints/REPORT.md", help="the Markdown report"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = "python -m core.report " + shlex.join(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate_bundle(args)
    except REPORT_ERRORS as error:
        logger.error("%s", error)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
