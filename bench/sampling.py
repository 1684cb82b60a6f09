"""Speed of windowed sampling: the cached sampler against the naive reference, on one model.

Run `python bench/sampling.py --json` from the repository root. The model has random weights
(speed does not depend on them); sizes default to the bundled model. Reports tokens/s of both
samplers, their ratio, the ceiling (one full window forward / one decode step) and the seconds
for a 1024x1024 image (64x64 tokens at f=16), model generation only unless --vqgan is given.
Each figure comes from the run with the median ratio of `--repeats` interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.sampler import (  # noqa: E402
    Condition,
    SamplingOptions,
    default_stride,
    sample_cached,
    sample_naive,
)
from core.transformer import GPT, GPTConfig  # noqa: E402

logger = logging.getLogger("bench.sampling")


def _pair(text: str) -> tuple[int, int]:
    rows, _, cols = text.partition("x")
    return int(rows), int(cols)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--image-vocab", type=int, default=1024)
    parser.add_argument("--window", type=_pair, default=(8, 12), help="rows x cols, e.g. 8x12")
    parser.add_argument(
        "--stride", type=_pair, default=None, help="rows x cols (default: half the window)"
    )
    parser.add_argument("--grid", type=_pair, default=(64, 64), help="token grid, rows x cols")
    parser.add_argument("--factor", type=int, default=16, help="VQGAN downsampling, for pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--no-aligned",
        dest="aligned",
        action="store_false",
        help="without the aligned condition path (the bundled model has it)",
    )
    parser.add_argument("--naive-rows", type=int, default=2, help="grid rows the naive runs")
    parser.add_argument("--unconditional", action="store_true", help="no condition grid")
    parser.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance (not 1: an unguided grid runs beside the condition)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a 2-core machine shared with other jobs, two "
        "threads measured several times slower, as each waits for the other to be scheduled)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measure ceiling, naive and cached this many times, interleaved, and report the "
        "medians (a shared machine's speed drifts by 20 %% between runs)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights and KV caches of both samplers (the exactness tests run in float32)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--vqgan", type=Path, default=None, help="image VQGAN checkpoint folder: also time decoding"
    )
    args = parser.parse_args(argv)
    if args.unconditional and args.guidance != 1:
        parser.error("--guidance needs a condition grid; drop --unconditional or --guidance")
    return args


def build(args: argparse.Namespace) -> tuple[GPT, Condition]:
    torch.manual_seed(0)
    config = GPTConfig(
        image_vocab=args.image_vocab,
        cond_vocab=1024,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.embd,
        window_rows=args.window[0],
        window_cols=args.window[1],
        aligned_condition=args.aligned and not args.unconditional,
    )
    model = GPT(config).to(args.device, getattr(torch, args.dtype)).eval()
    grid_h, grid_w = args.grid
    prefix = torch.zeros(args.batch, 1, dtype=torch.long, device=args.device)
    tokens = unguided = None
    if not args.unconditional:
        shape = (args.batch, grid_h, grid_w)
        tokens = torch.randint(1, 1024, shape, device=args.device)
        if args.guidance != 1:
            unguided = torch.zeros_like(tokens)
    return model, Condition(prefix, tokens, unguided)


def _seconds(function, repeats: int) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def measure_ceiling(model: GPT, condition: Condition, args: argparse.Namespace) -> dict:
    """Time of one full window forward and one decode step at the window's last token."""
    rows, cols = args.window
    cond = None
    if condition.tokens is not None:
        cond = condition.tokens[:, :rows, :cols].reshape(args.batch, -1)
    image = torch.randint(0, args.image_vocab, (args.batch, rows * cols), device=args.device)
    before = image[:, :-1]

    def full() -> None:
        model.next_token_logits(condition.prefix, cond, before, rows, cols)

    cache = model.new_cache(args.batch, rows, cols, cond is not None)
    model.prefill(cache, condition.prefix, cond, before[:, :-1], rows, cols)
    last = rows * cols - 2

    def decode() -> None:
        model.truncate(cache, last)
        model.decode_one(cache, before[:, -1], last)

    forward_s, decode_s = _seconds(full, 5), _seconds(decode, 50)
    return {"full_forward_s": forward_s, "decode_step_s": decode_s, "ceiling": forward_s / decode_s}


def measure_naive(model: GPT, condition: Condition, args: argparse.Namespace) -> dict:
    """Seconds per token (wall and CPU) of the naive sampler on rows in the middle of the grid."""
    grid_h, grid_w = args.grid
    first = max(0, grid_h // 2 - args.naive_rows // 2)
    known = torch.randint(0, args.image_vocab, (args.batch, grid_h, grid_w), device=args.device)
    mask = torch.zeros(1, grid_h, grid_w, dtype=torch.bool, device=args.device)
    mask[:, first : first + args.naive_rows] = True  # rows above are known: full context
    sampler = sample_naive(
        model,
        condition,
        grid_h,
        grid_w,
        SamplingOptions(guidance=args.guidance),
        args.window,
        args.stride,
        known,
        mask,
    )
    cpu = time.process_time()
    event = None
    for event in sampler:  # noqa: B007 (the last event is the result)
        pass
    cpu = time.process_time() - cpu
    return {"wall": event.elapsed / event.tokens_total, "cpu": cpu / event.tokens_total}


def measure_cached(model: GPT, condition: Condition, args: argparse.Namespace) -> dict:
    """Seconds for the whole grid with the cached sampler, and how its work was split."""
    grid_h, grid_w = args.grid
    work: dict[str, int] = {}
    sampler = sample_cached(
        model,
        condition,
        grid_h,
        grid_w,
        SamplingOptions(guidance=args.guidance),
        args.window,
        args.stride,
        work=work,
    )
    cpu = time.process_time()
    event = None
    for event in sampler:  # noqa: B007 (the last event is the result)
        pass
    cpu = time.process_time() - cpu
    return {"seconds": event.elapsed, "cpu": cpu, "tokens": event.tokens_total, "work": work}


def measure_vqgan(folder: Path, tokens: torch.Tensor, device: str) -> float:
    """Seconds to decode `tokens` [B, h, w] with the image VQGAN in `folder`."""
    from core.checkpoint import load_checkpoint, load_state_strict
    from core.config import config_from_dict
    from core.vqgan import VQGAN, VQGANConfig

    checkpoint = load_checkpoint(folder)
    vqgan = VQGAN(config_from_dict(VQGANConfig, checkpoint.model, str(folder)))
    load_state_strict(vqgan, checkpoint.state, str(folder))
    vqgan = vqgan.to(device).eval()
    tokens = tokens.clamp(0, vqgan.config.codebook_size - 1)
    started = time.perf_counter()
    vqgan.decode_indices(tokens, tile=32)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.stride is None:
        args.stride = default_stride(args.window)
    model, condition = build(args)
    runs = []
    for _ in range(max(1, args.repeats)):
        ceiling = measure_ceiling(model, condition, args)
        naive = measure_naive(model, condition, args)
        cached = measure_cached(model, condition, args)
        runs.append((ceiling, naive, cached))
    speedups = [n["wall"] / (c["seconds"] / c["tokens"]) for _, n, c in runs]
    order = sorted(range(len(runs)), key=speedups.__getitem__)
    ceiling, naive, cached = runs[order[len(order) // 2]]  # the run with the median speedup
    cached_s = cached["seconds"] / cached["tokens"]
    report = {
        "model": {"n_layer": args.layers, "n_embd": args.embd, "n_head": args.heads},
        "window": list(args.window),
        "stride": list(args.stride),
        "grid": list(args.grid),
        "pixels": [args.grid[1] * args.factor, args.grid[0] * args.factor],  # width, height
        "batch": args.batch,
        "conditional": not args.unconditional,
        "aligned_condition": model.config.aligned_condition,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "guidance": args.guidance,
        "cached_tokens_per_s": args.batch / cached_s,
        "naive_tokens_per_s": args.batch / naive["wall"],
        "speedup": naive["wall"] / cached_s,  # median over the repeats
        "speedup_each_run": [round(value, 2) for value in speedups],
        "ceiling_each_run": [round(c["ceiling"], 2) for c, _, _ in runs],
        # CPU time is steadier than wall time on a machine shared with other jobs
        "speedup_cpu_time": naive["cpu"] / (cached["cpu"] / cached["tokens"]),
        "ceiling": ceiling["ceiling"],
        "full_forward_s": ceiling["full_forward_s"],
        "decode_step_s": ceiling["decode_step_s"],
        "grid_seconds": cached["seconds"],
        "grid_cpu_seconds": cached["cpu"],
        "cached_work": cached["work"],
    }
    if args.vqgan is not None:
        grid = torch.randint(0, args.image_vocab, (args.batch, *args.grid))
        report["vqgan_decode_seconds"] = measure_vqgan(args.vqgan, grid, args.device)
        report["image_seconds"] = report["grid_seconds"] + report["vqgan_decode_seconds"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            logger.info("%-22s %s", key, value)
    return report


if __name__ == "__main__":
    main()
