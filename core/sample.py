"""Command-line sampling: a condition file (or none) in, PNGs out, with a progress bar.

python -m core.sample --layout my_layout.png --size 1280x832 --seed 3 --out out/
python -m core.sample --sketch sketch.png --size 512x512
python -m core.sample --depth depth.png --size 768x512
python -m core.sample --superres small.jpg --factor 4
python -m core.sample --scene lake --size 1024x576
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError
from tqdm import tqdm

from core.checkpoint import CheckpointError
from core.conditions import ConditionError, load_depth
from core.data import DataError, load_rgb
from core.metadata import request_settings, save_png
from core.palette import LayoutError, load_label_map
from core.pipeline import MAX_PRIOR, GenerateRequest, InputError, Pipeline, Preview

logger = logging.getLogger("core.sample")


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got '{text}'") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.sample",
        description="Generate landscapes from a layout, sketch, depth map, small photo or "
        "nothing, with the bundled (or any) models.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--layout", help="label map PNG (palette ids) or palette-coloured image")
    source.add_argument("--sketch", help="sketch image: dark lines on light paper or the reverse")
    source.add_argument("--depth", help="depth map (near = bright): PNG 8/16-bit, TIFF, .npy")
    source.add_argument("--superres", help="small photo to enlarge ×4 or ×8")
    parser.add_argument("--scene", help="free mode: field, forest, lake, mountain, ocean, road")
    parser.add_argument(
        "--factor", type=int, default=None, choices=(4, 8), help="superres factor (default 4)"
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="WxH in pixels (default: the layout's, sketch's or depth map's own size, shrunk to "
        "fit 2048 px a side; 512x512 in free mode; superres: the photo's size × --factor)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=100, help="0 = off (default 100)")
    parser.add_argument("--top-p", type=float, default=None, help="0 to 1 (default: off)")
    parser.add_argument(
        "--window", type=int, default=0, help="window rows in tokens (0 = as trained, default)"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="layout, sketch and free with --scene: how closely to follow the condition "
        "(1 = plain sampling; "
        f"default {GenerateRequest.guidance:g})",
    )
    parser.add_argument(
        "--prior",
        type=float,
        default=None,
        help="layout: weight of the class prior, which leans each painted region toward image "
        f"codes its class covers in the training photos (0 = off; default "
        f"{GenerateRequest.prior:g}; needs the bundle's layout_prior.safetensors)",
    )
    parser.add_argument(
        "--compose",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="over 640 px high (free mode: 256): compose a picture 192–320 px high (the scale "
        "of the training photos), then enlarge it with superres (default); --no-compose samples "
        "the size directly",
    )
    parser.add_argument("--samples", type=int, default=1, help="images to make at once")
    parser.add_argument("--checkpoints", default="checkpoints", help="model bundle folder")
    parser.add_argument("--out", default="samples", help="folder for the PNGs (default: samples/)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return parser


def read_condition(args) -> tuple[str, np.ndarray | None]:
    """The mode and the condition array named by the arguments."""
    try:
        if args.layout:
            return "layout", load_label_map(args.layout)
        if args.sketch:
            return "sketch", load_rgb(args.sketch)
        if args.depth:
            return "depth", load_depth(args.depth)
        if args.superres:
            return "superres", load_rgb(args.superres)
    except (LayoutError, ConditionError, DataError, UnidentifiedImageError, OSError) as error:
        raise InputError(str(error)) from None
    return "free", None


def ignored_flags(args, request: GenerateRequest, pipeline: Pipeline) -> dict[str, str]:
    """Flags given that the request's mode does not use, each with why."""
    ignored = {}
    if args.factor is not None and request.mode != "superres":
        ignored["--factor"] = "it is the superres enlargement; give --superres with it"
    if args.size is not None and request.mode == "superres":
        ignored["--size"] = "a superres picture is the photo's size × --factor"
    if args.guidance is not None and not pipeline.guided(request):
        ignored["--guidance"] = "guidance steers layouts, sketches and free pictures of a --scene"
    if args.prior is not None and request.mode != "layout":
        ignored["--prior"] = "the class prior leans painted layout regions; give --layout with it"
    return ignored


def default_size(condition: np.ndarray | None, mode: str, max_side: int) -> tuple[int, int]:
    """The output size when --size is not given: the condition's own (at most max_side a side,
    aspect kept), or 512×512 in free mode (superres ignores it)."""
    if condition is None or mode == "superres":
        return 512, 512
    height, width = condition.shape[:2]
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def free_path(folder: Path, stem: str) -> Path:
    """folder/stem.png, or stem-2.png, stem-3.png… when taken: earlier results are kept."""
    path, number = folder / f"{stem}.png", 1
    while path.exists():
        number += 1
        path = folder / f"{stem}-{number}.png"
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.temperature > 0:
        parser.error(
            f"--temperature must be above 0, got {args.temperature:g} (1 samples as trained; "
            "lower, e.g. 0.7, plays safer)"
        )
    if args.prior is not None and not 0 <= args.prior <= MAX_PRIOR:
        parser.error(f"--prior must be from 0 to {MAX_PRIOR:g}, got {args.prior:g}")
    if args.scene and (args.layout or args.sketch or args.depth or args.superres):
        parser.error(
            "--scene is for free mode only: drop it, or drop the layout/sketch/depth/photo"
        )
    if args.top_k < 0:
        parser.error(f"--top-k must be 0 (off) or more, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be above 0 and at most 1 (1 = off), got {args.top_p:g}")
    if args.window < 0:
        parser.error(
            f"--window must be 0 (as trained) or a number of token rows, got {args.window}"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    try:
        mode, condition = read_condition(args)
        pipeline = Pipeline.load(args.checkpoints)
        prior = GenerateRequest.prior if args.prior is None else args.prior
        if mode == "layout" and prior > 0 and pipeline.layout_prior is None:
            logger.warning(
                "%s has no usable layout_prior.safetensors: sampling without the class prior "
                "(python -m core.layout_prior adds it)",
                args.checkpoints,
            )
        width, height = args.size or default_size(condition, mode, pipeline.max_side)
        request = GenerateRequest(
            mode=mode,
            width=width,
            height=height,
            condition=condition,
            scene=args.scene,
            superres_factor=args.factor or 4,
            seed=args.seed,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=None if args.top_p == 1 else args.top_p,
            window=args.window or None,
            guidance=GenerateRequest.guidance if args.guidance is None else args.guidance,
            prior=prior,
            compose=args.compose,
            num_samples=args.samples,
        )
        for flag, unused in ignored_flags(args, request, pipeline).items():
            logger.warning("%s is ignored: %s", flag, unused)
        # the saved settings say what was used: no class prior outside layouts
        request = replace(request, prior=pipeline.prior_in_use(request))
        bar = None
        for event in pipeline.generate(request):
            if isinstance(event, Preview):
                if bar is None:
                    bar = tqdm(total=event.tokens_total, desc=f"{mode} {width}x{height}")
                bar.n = event.tokens_done
                bar.refresh()
                continue
            result = event
        if bar is not None:
            bar.close()
    except (InputError, CheckpointError) as error:
        logger.error("%s", error)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(result.images):
        path = free_path(out, f"{mode}-seed{args.seed}-{index}")
        save_png(image, path, request_settings(request), pipeline.name, sample=index)
        print(path)
    logger.info("%d image(s) in %.1f s", len(result.images), result.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
