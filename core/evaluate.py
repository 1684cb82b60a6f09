"""Measure trained models on held-out photos: `python -m core.evaluate MODEL ...` prints JSON.

One subcommand per kind of model, each registered by a small `add_*_command` function listed in
`COMMANDS`; each returns a plain dict that `main` prints (and saves with `--out`). Progress goes
to stderr, the JSON report to stdout. Today: `vqgan` (stage-1 reconstructions against a bicubic
thumbnail and JPEG at its lowest quality).

    python -m core.evaluate vqgan --checkpoint runs/vqgan/checkpoint --limit 50
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from core.checkpoint import CheckpointError, load_checkpoint
from core.config import ConfigError
from core.data import DataError, load_rgb, read_index, to_tensor, to_uint8
from core.losses import PerceptualDistance, PerceptualWeightsError
from core.models import stage_from_checkpoint, vqgan_from_checkpoint
from core.report import REPORT_ERRORS, add_bundle_command, psnr
from core.vqgan import CodeUsage

logger = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """The evaluation cannot run as asked (a size that does not fit the model, no photos)."""


# ----------------------------------------------------------------------------- loading


# ----------------------------------------------------------------------------- photos


def center_square(
    image: np.ndarray, size: int, resample=Image.Resampling.LANCZOS
) -> np.ndarray | None:
    """The photo's short side scaled down to `size` (never up), then its centre size×size;
    None for a photo smaller than `size`."""
    height, width = image.shape[:2]
    short = min(height, width)
    if short < size:
        return None
    if short > size:
        scale = size / short
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(resized, resample))
        height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def evaluation_photos(index: str, split: str, size: int, limit: int | None) -> tuple[list, int]:
    """Centre squares of the split's photos, in index order, and how many were too small."""
    records = read_index(index, split)
    squares, too_small = [], 0
    for record in records:
        if limit is not None and len(squares) >= limit:
            break
        try:
            square = center_square(load_rgb(record.photo), size)
        except DataError as error:
            logger.warning("skipping %s", error)
            continue
        if square is None:
            too_small += 1
        else:
            squares.append(square)
    if not squares:
        raise EvaluationError(
            f"no photo in split '{split}' of {index} has a short side of {size} px or more; "
            "choose a smaller --size"
        )
    return squares, too_small


# ----------------------------------------------------------------------------- measures


def bicubic_from_thumbnail(image: np.ndarray, factor: int) -> np.ndarray:
    """Reduce to 1/factor (PIL's antialiased bicubic), store as 8 bits, scale back bicubically."""
    size = image.shape[1], image.shape[0]
    thumbnail = Image.fromarray(image).resize(
        (size[0] // factor, size[1] // factor), Image.Resampling.BICUBIC
    )
    return np.asarray(thumbnail.resize(size, Image.Resampling.BICUBIC))


def jpeg_round_trip(image: np.ndarray, quality: int) -> tuple[np.ndarray, int]:
    """The image after JPEG at `quality`, and the file's size in bits (headers included)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    bits = 8 * buffer.tell()
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")), bits


@dataclass
class MethodScores:
    """Per-image figures of one way of compressing the photos."""

    psnr: list[float]
    perceptual: list[float]
    bits_per_pixel: list[float]

    @classmethod
    def empty(cls) -> MethodScores:
        return cls([], [], [])

    def add(self, originals: list, results: list, perceptual: PerceptualDistance, bpp) -> None:
        self.psnr += [psnr(a, b) for a, b in zip(originals, results, strict=True)]
        with torch.no_grad():
            distance = perceptual(to_tensor(results), to_tensor(originals))
        self.perceptual += distance.tolist()
        self.bits_per_pixel += bpp if isinstance(bpp, list) else [bpp] * len(results)

    def summary(self) -> dict:
        return {
            "psnr_db": round(float(np.mean(self.psnr)), 3),
            "perceptual_squeezenet": round(float(np.mean(self.perceptual)), 4),
            "bits_per_pixel": round(float(np.mean(self.bits_per_pixel)), 4),
        }


# ----------------------------------------------------------------------------- vqgan


def evaluate_vqgan(args: argparse.Namespace) -> dict:
    """Reconstruction quality, codebook use and rate of a stage-1 image model vs baselines."""
    checkpoint = load_checkpoint(args.checkpoint, "vqgan:image")
    model = vqgan_from_checkpoint(checkpoint)
    f, codebook_size = model.factor, model.config.codebook_size
    if args.size % f:
        raise EvaluationError(f"--size {args.size} is not a multiple of the model's f = {f}")
    squares, too_small = evaluation_photos(args.index, args.split, args.size, args.limit)
    perceptual = PerceptualDistance()

    token_bpp = math.log2(codebook_size) / f**2
    ours, bicubic, jpeg = MethodScores.empty(), MethodScores.empty(), MethodScores.empty()
    usage = CodeUsage(codebook_size, window=len(squares))
    bar = tqdm(total=len(squares), desc="vqgan", unit="photo", file=sys.stderr)
    for start in range(0, len(squares), args.batch_size):
        originals = squares[start : start + args.batch_size]
        with torch.no_grad():
            output, quantized = model(to_tensor(originals))
        usage.update(quantized.indices)
        ours.add(originals, list(to_uint8(output)), perceptual, token_bpp)
        thumbnails = [bicubic_from_thumbnail(image, f) for image in originals]
        bicubic.add(originals, thumbnails, perceptual, 24 / f**2)
        compressed = [jpeg_round_trip(image, quality=1) for image in originals]
        jpeg_bpp = [bits / args.size**2 for _, bits in compressed]
        jpeg.add(originals, [image for image, _ in compressed], perceptual, jpeg_bpp)
        bar.update(len(originals))
    bar.close()

    grid = args.size // f
    return {
        "command": "vqgan",
        "checkpoint": str(args.checkpoint),
        "weights_sha256": checkpoint.weights_sha256,
        "trained_steps": checkpoint.extra.get("step"),
        "data": {
            "index": str(args.index),
            "split": args.split,
            "photos": len(squares),
            "skipped_smaller_than_size": too_small,
            "size": args.size,
            "preparation": "short side scaled down to size (Lanczos), centre square",
        },
        "psnr": "mean over photos of the per-photo PSNR of 8-bit RGB",
        "vqgan": {
            **ours.summary(),
            "token_grid": [grid, grid],
            "codebook_usage": round(usage.usage(), 4),
            "perplexity": round(usage.perplexity(), 2),
            "bits_per_pixel_note": f"log2({codebook_size}) bits per token of {f}x{f} pixels",
        },
        "bicubic_thumbnail": {
            **bicubic.summary(),
            "thumbnail": f"{grid}x{grid} 8-bit RGB (24 bits per {f}x{f} pixels), "
            "upscaled bicubically",
        },
        "jpeg_quality_1": {
            **jpeg.summary(),
            "note": "PIL JPEG quality=1, file size with headers; its lowest rate is still above "
            "the token grid's",
        },
    }


def add_vqgan_command(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "vqgan",
        parents=[common],
        help="stage-1 image VQGAN: PSNR, perceptual distance, codebook use, bits per pixel",
        description="Reconstruct held-out photos with a stage-1 image VQGAN and compare with a "
        "bicubic 1/f thumbnail and JPEG at quality 1.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (vqgan:image)")
    parser.add_argument("--index", default="../shared/data/index.jsonl", help="index.jsonl")
    parser.add_argument("--split", default="val", help="split of the index to use")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many photos")
    parser.add_argument("--size", type=int, default=256, help="square crop, a multiple of f")
    parser.add_argument("--batch-size", type=int, default=4, help="photos per forward pass")
    parser.set_defaults(evaluate=evaluate_vqgan)


# ----------------------------------------------------------------------------- conditions


def evaluate_condition(args: argparse.Namespace) -> dict:
    """How well a condition stage reconstructs its maps on held-out photos.

    layout: pixel accuracy of the reconstructed ids (free pixels excluded); edges: F-score of
    reconstructed strokes against the input (Canny edges of val photos, and BSDS500's human
    edges); depth: mean absolute error and rank correlation of reconstructed depth.
    """
    from core.condition_stages import condition_input
    from core.conditions import (
        canny_edges,
        edge_f_score,
        estimate_depth_from_layout,
        load_human_edges,
        spearman_correlation,
    )
    from core.palette import Palette, load_label_map

    checkpoint = load_checkpoint(args.checkpoint)
    kind = checkpoint.kind.partition(":")[2]
    if kind not in ("layout", "edges", "depth"):
        raise EvaluationError(
            f"{args.checkpoint} is a '{checkpoint.kind}' model, not a condition stage"
        )
    model, palette = stage_from_checkpoint(checkpoint), Palette.default()
    records = read_index(args.index, args.split)
    if kind == "edges" and args.human_edges:
        records = [r for r in read_index(args.index, "val") + read_index(args.index, "test")
                   if r.edges is not None]  # fmt: skip
    if kind != "edges":
        records = [r for r in records if r.label is not None]
    records = records[: args.limit] if args.limit else records
    scores: list[float] = []
    extra: list[float] = []
    for record in tqdm(records, desc=kind, unit="map", file=sys.stderr):
        original = load_rgb(record.photo)
        photo = center_square(original, args.size)
        if photo is None:
            continue
        if kind == "edges":
            if args.human_edges:
                human = load_human_edges(record.edges)
                target = center_square(human, args.size, Image.Resampling.NEAREST)
            else:
                target = canny_edges(photo)
            inputs = condition_input("edges", target[None], palette)
        else:
            ids = load_label_map(record.label, palette).astype(np.uint8)
            if ids.shape != original.shape[:2]:
                size = (original.shape[1], original.shape[0])
                ids = np.asarray(Image.fromarray(ids).resize(size, Image.NEAREST))
            ids = center_square(ids, args.size, Image.Resampling.NEAREST).astype(np.int64)
            if kind == "layout":
                inputs = condition_input("layout", ids[None], palette)
            else:
                depth = estimate_depth_from_layout(ids, palette)
                inputs = condition_input("depth", depth[None], palette)
        with torch.no_grad():
            output, _ = model(inputs)
        if kind == "layout":
            scores.append(float((output.argmax(1)[0].numpy() == ids).mean()))
        elif kind == "edges":
            strokes = (output[0, 0] > 0).numpy().astype(np.uint8) * 255
            scores.append(edge_f_score(strokes, (inputs[0, 0] > 0).numpy().astype(np.uint8) * 255))
        else:
            truth, guess = inputs[0, 0].numpy(), output[0, 0].float().numpy()
            scores.append(float(np.abs(truth - guess).mean() / 2))
            extra.append(spearman_correlation(truth, guess))
    if not scores:
        raise EvaluationError(f"no photo of split '{args.split}' is {args.size} px or larger")
    names = {"layout": "pixel_accuracy", "edges": "stroke_f_score", "depth": "mean_abs_error"}
    report = {
        "command": "condition",
        "checkpoint": str(args.checkpoint),
        "kind": kind,
        "trained_steps": checkpoint.extra.get("step"),
        "maps": len(scores),
        "size": args.size,
        "source": "BSDS500 human edges (val+test)" if kind == "edges" and args.human_edges
        else f"split '{args.split}'",
        names[kind]: round(float(np.mean(scores)), 4),
    }  # fmt: skip
    if kind == "edges":
        report["note"] = "strokes thickened to 3 px, as the stage sees them; tolerance 2 px"
    if extra:
        report["spearman"] = round(float(np.mean(extra)), 4)
        report["note"] = "depth in [0, 1] estimated from the val label maps (core.conditions)"
    return report


def add_condition_command(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "condition",
        parents=[common],
        help="a condition stage (layout, edges, depth): reconstruction of its maps",
        description="Encode and decode held-out condition maps with a condition stage.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (vqgan:<kind>)")
    parser.add_argument("--index", default="../shared/data/index.jsonl", help="index.jsonl")
    parser.add_argument("--split", default="val", help="split of the index to use")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many maps")
    parser.add_argument("--size", type=int, default=128, help="square crop, a multiple of f")
    parser.add_argument(
        "--human-edges", action="store_true", help="edges: BSDS500's human edge maps as input"
    )
    parser.set_defaults(evaluate=evaluate_condition)


# Each entry adds one subcommand; its parser must set `evaluate` to a function args -> dict.
COMMANDS: tuple[Callable[[argparse._SubParsersAction, argparse.ArgumentParser], None], ...] = (
    add_vqgan_command,
    add_condition_command,
    add_bundle_command,
)


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", help="also write the JSON report to this file")
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser = argparse.ArgumentParser(
        prog="python -m core.evaluate",
        description="Measure a trained model on held-out data; prints a JSON report.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="MODEL")
    for add_command in COMMANDS:
        add_command(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        report = args.evaluate(args)
    except (
        CheckpointError,
        ConfigError,
        DataError,
        EvaluationError,
        PerceptualWeightsError,
        *REPORT_ERRORS,
    ) as error:
        logger.error("%s", error)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
