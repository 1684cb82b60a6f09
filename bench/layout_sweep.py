"""Layout fidelity of sampling settings on held-out val layouts (the sweeps in the cards).

Run `python bench/layout_sweep.py 5,1.0,100,3 5,0.8,100,3` from the repository root: each argument
is guidance,temperature,top-k[,prior] (top-k 0 = off; the class prior's weight, 0 = off, is 0
when left out). For every setting the bundle generates from the
layouts of each group's val photos after the first `--skip` (the ones `core.report` measures),
at 256 px high, with seeds 0, 100 and 200 + photo number, and prints one JSON line: the DeepLab
mIoU of the generated images against the layouts, its ratio to the real photos' mIoU, and the
IoU of each painted class, averaged over the seeds. Needs `../shared/data` and `../shared/models`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.pipeline import Pipeline  # noqa: E402
from core.report import (  # noqa: E402
    DEFAULT_INDEX,
    DEFAULT_MODELS,
    DEFAULT_PALETTE_SOURCES,
    ImageGenerator,
    ReportSettings,
    Segmenter,
    by_source_in_turn,
    layout_groups,
    measure_layouts,
    read_val_photos,
)

SEEDS = (0, 100, 200)


def parse_setting(text: str) -> tuple[float, float, int, float]:
    try:
        guidance, temperature, top_k, *prior = text.split(",")
        if len(prior) > 1:
            raise ValueError
        return float(guidance), float(temperature), int(top_k), float(prior[0] if prior else 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not guidance,temperature,top-k[,prior] (e.g. 5,1.0,100,3)"
        ) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "settings", nargs="+", type=parse_setting, help="guidance,temperature,k[,prior]"
    )
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--skip", type=int, default=20, help="photos per group the report uses")
    parser.add_argument("--limit", type=int, default=12, help="photos per group")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipeline = Pipeline.load(args.checkpoints)
    photos = by_source_in_turn(read_val_photos(DEFAULT_INDEX, "val"))
    groups = layout_groups(photos, args.skip)
    segmenter = Segmenter(DEFAULT_MODELS, DEFAULT_PALETTE_SOURCES, pipeline.palette, args.threads)
    for guidance, temperature, top_k, prior in args.settings:
        per_group: dict[str, list[dict]] = {}
        for seed in SEEDS:
            settings = ReportSettings(
                limit=args.limit,
                seed=seed,
                temperature=temperature,
                top_k=top_k or None,
                guidance=guidance,
                prior=prior,
            )
            section, _ = measure_layouts(
                ImageGenerator(pipeline, settings), segmenter, groups, settings
            )
            for group, figures in section.figures.items():
                per_group.setdefault(group, []).append(figures)
        line = {"guidance": guidance, "temperature": temperature, "top_k": top_k, "prior": prior}
        for group, runs in per_group.items():
            line[group] = {
                key: sum(run[key] for run in runs) / len(runs)
                for key in ("miou_generated", "miou_real", "miou_ratio")
            }
            line[group]["photos"] = runs[0]["photos"]
            line[group]["iou_generated"] = {  # per painted class, averaged over the seeds
                name: round(
                    sum(run["classes"][name]["iou_generated"] for run in runs) / len(runs), 3
                )
                for name in runs[0]["classes"]
            }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
