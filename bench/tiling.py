"""Benchmark: does tiled decoding match a whole decode, hide its seams and stay small in memory?

Decodes one token grid whole and in overlapping tiles (`core.vqgan.tiled_decode`), compares the
two (PSNR; largest difference near tile seams and elsewhere; the pixel step across seam lines),
then decodes a 2048×2048 image tiled in a fresh subprocess and reads its peak resident memory
(VmHWM from /proc). With `--checkpoint` the grid is a validation photo encoded by the trained
model; without one, a random model from configs/vqgan.yaml decodes the same photo's grid.

    python bench/tiling.py --json [--checkpoint runs/vqgan/checkpoint --tile 16 --overlap 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from core.config import load_config  # noqa: E402
from core.data import load_rgb, read_index, to_tensor, to_uint8  # noqa: E402
from core.evaluate import psnr  # noqa: E402
from core.models import load_vqgan  # noqa: E402
from core.train_vqgan import VQGANTrainConfig  # noqa: E402
from core.vqgan import VQGAN, _tile_starts, tiled_decode  # noqa: E402

MEMORY_LIMIT_GIB = 4.0
SEAM_BAND = 2  # pixels either side of a tile edge that count as "at the seam"


def build_model(checkpoint: str | None, config_path: str) -> VQGAN:
    if checkpoint:
        return load_vqgan(checkpoint, "image")[0]
    torch.manual_seed(0)
    return VQGAN(load_config(VQGANTrainConfig, config_path).model).eval()


def photo_tokens(model: VQGAN, index: str, tokens: int) -> torch.Tensor:
    """Indices 1,tokens,tokens of the first validation photo, its centre square resized to fit."""
    photo = load_rgb(read_index(index, "val")[0].photo)
    height, width = photo.shape[:2]
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    side = tokens * model.factor
    square = Image.fromarray(photo[top : top + short, left : left + short])
    pixels = to_tensor([np.asarray(square.resize((side, side), Image.Resampling.BICUBIC))])
    with torch.no_grad():
        return model.encode_indices(pixels)


def seam_mask(size: int, tile: int, overlap: int, f: int) -> torch.Tensor:
    """Bool (size·f,) marking pixel lines within SEAM_BAND of an inner tile edge."""
    mask = torch.zeros(size * f, dtype=torch.bool)
    for start in _tile_starts(size, tile, overlap):
        for edge in (start, start + tile):
            if 0 < edge < size:
                mask[max(0, edge * f - SEAM_BAND) : edge * f + SEAM_BAND] = True
    return mask


def seam_lines(size: int, tile: int, overlap: int, f: int) -> list[int]:
    """Pixel lines where a tile begins or ends inside the image."""
    edges = set()
    for start in _tile_starts(size, tile, overlap):
        edges.update(e * f for e in (start, start + tile) if 0 < e < size)
    return sorted(edges)


def mean_step(image: torch.Tensor, lines: list[int]) -> float:
    """Mean |pixel - pixel above| on the given rows and, transposed, columns (8-bit levels)."""
    rows = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    cols = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(dim=(0, 1, 2))
    above = [line - 1 for line in lines]
    return float((rows[above].mean() + cols[above].mean()) / 2 * 127.5)


def compare(model: VQGAN, indices: torch.Tensor, tile: int, overlap: int) -> dict:
    """Whole vs tiled decode of one grid."""
    f, size = model.factor, indices.shape[-1]
    with torch.no_grad():
        start = time.perf_counter()
        whole = model.decode_indices(indices).float().clamp(-1, 1)
        whole_seconds = time.perf_counter() - start
        start = time.perf_counter()
        tiled = tiled_decode(model, indices, tile, overlap).clamp(-1, 1)
        tiled_seconds = time.perf_counter() - start

    difference = (whole - tiled).abs().amax(dim=(0, 1)) * 127.5  # H,W in 8-bit levels
    near = seam_mask(size, tile, overlap, f)
    near_seams = near[:, None] | near[None, :]
    tile_edges = seam_lines(size, tile, overlap, f)
    token_edges = [k * f for k in range(1, size) if k * f not in tile_edges]
    return {
        "grid_tokens": [size, size],
        "pixels": [size * f, size * f],
        "tile_tokens": tile,
        "overlap_tokens": overlap,
        "psnr_tiled_vs_whole_db": round(psnr(to_uint8(whole)[0], to_uint8(tiled)[0]), 2),
        "max_abs_difference_8bit": {
            f"within_{SEAM_BAND}px_of_tile_edges": round(float(difference[near_seams].max()), 2),
            "elsewhere": round(float(difference[~near_seams].max()), 2),
        },
        # a seam shows as a larger jump across tile edges than across other token edges
        "mean_step_across_lines_8bit": {
            "tiled_at_tile_edges": round(mean_step(tiled, tile_edges), 3),
            "tiled_at_other_token_edges": round(mean_step(tiled, token_edges), 3),
            "whole_at_tile_edges": round(mean_step(whole, tile_edges), 3),
            "whole_at_other_token_edges": round(mean_step(whole, token_edges), 3),
        },
        "seconds": {"whole": round(whole_seconds, 2), "tiled": round(tiled_seconds, 2)},
    }


# ----------------------------------------------------------------------------- memory


def peak_rss_kib() -> int:
    """This process's peak resident set size (VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line (Linux only)")


def memory_probe(args: argparse.Namespace) -> dict:
    """Run in a fresh process: the peak memory a tiled decode of --memory-size adds."""
    model = build_model(args.checkpoint, args.config)
    tokens = args.memory_size // model.factor
    indices = torch.randint(0, model.config.codebook_size, (1, tokens, tokens))
    before = peak_rss_kib()
    start = time.perf_counter()
    with torch.no_grad():
        pixels = tiled_decode(model, indices, args.tile, args.overlap)
    seconds = time.perf_counter() - start
    after = peak_rss_kib()
    return {
        "pixels": list(pixels.shape[-2:]),
        "seconds": round(seconds, 1),
        "peak_rss_before_kib": before,
        "peak_rss_after_kib": after,
    }


def measure_memory(args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--memory-probe", "--memory-size", str(args.memory_size)]
    command += ["--tile", str(args.tile), "--overlap", str(args.overlap)]
    command += ["--config", args.config, "--threads", str(args.threads)]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    probe = json.loads(result.stdout)
    peak_gib = probe["peak_rss_after_kib"] / 2**20
    delta_mib = (probe["peak_rss_after_kib"] - probe["peak_rss_before_kib"]) / 2**10
    return {
        "pixels": probe["pixels"],
        "seconds": probe["seconds"],
        "peak_rss_gib": round(peak_gib, 3),
        "peak_rss_added_by_decode_mib": round(delta_mib, 1),
        "limit_gib": MEMORY_LIMIT_GIB,
        "within_limit": peak_gib < MEMORY_LIMIT_GIB,
        "how": "VmHWM of a fresh process (model loaded, then one tiled decode), fp32",
    }


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="vqgan:image checkpoint folder (else a random model)")
    parser.add_argument("--config", default="configs/vqgan.yaml", help="config of the random model")
    parser.add_argument("--index", default="../shared/data/index.jsonl", help="photos to encode")
    parser.add_argument("--tokens", type=int, default=32, help="side of the compared grid")
    parser.add_argument("--tile", type=int, default=16, help="tile side in tokens")
    parser.add_argument("--overlap", type=int, default=4, help="tile overlap in tokens")
    parser.add_argument("--memory-size", type=int, default=2048, help="pixels, memory check")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return 0

    model = build_model(args.checkpoint, args.config)
    indices = photo_tokens(model, args.index, args.tokens)
    report = {
        "benchmark": "tiled vs whole decode",
        "model": args.checkpoint or f"random weights, {args.config}",
        "f": model.factor,
        "threads": args.threads,
        "comparison": compare(model, indices, args.tile, args.overlap),
        "memory_tiled_decode": measure_memory(args),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        comparison, memory = report["comparison"], report["memory_tiled_decode"]
        print(f"PSNR tiled vs whole: {comparison['psnr_tiled_vs_whole_db']} dB")
        print(f"max |difference| (8-bit): {comparison['max_abs_difference_8bit']}")
        print(f"step across lines (8-bit): {comparison['mean_step_across_lines_8bit']}")
        print(
            f"{memory['pixels']} tiled decode: peak {memory['peak_rss_gib']} GiB "
            f"(limit {MEMORY_LIMIT_GIB} GiB), {memory['seconds']} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
