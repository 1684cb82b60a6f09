"""Does a free picture of a scene class show that scene? One JSON line per guidance value.

Run `python bench/scene_sweep.py 1 3 5` from the repository root: for each guidance value
(1 = plain sampling from the scene's prefix), the bundle generates free pictures of every scene
class at 256×256 with seeds 0..--seeds-1, and the ADE20K segmenter of the report (mapped to the
palette) measures the share of each picture covered by the scene's own class (field: grass,
forest: tree, lake and ocean: water, mountain: mountain, road: road). The line gives that share
averaged per scene and over all, and how many pictures it covers at least --enough of. Needs
`../shared/models` and `../shared/data/palette_sources.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.pipeline import GenerateRequest, Pipeline, Result  # noqa: E402
from core.segmenter import DEFAULT_MODELS, DEFAULT_PALETTE_SOURCES, Segmenter  # noqa: E402

SCENE_CLASS = {
    "field": "grass",
    "forest": "tree",
    "lake": "water",
    "mountain": "mountain",
    "ocean": "water",
    "road": "road",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("guidance", nargs="+", type=float, help="guidance values (1 = none)")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--seeds", type=int, default=4, help="pictures per scene")
    parser.add_argument("--size", type=int, default=256, help="width and height, px")
    parser.add_argument("--enough", type=float, default=0.15, help="share that counts as shown")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipeline = Pipeline.load(args.checkpoints)
    segmenter = Segmenter(DEFAULT_MODELS, DEFAULT_PALETTE_SOURCES, pipeline.palette, args.threads)
    for guidance in args.guidance:
        shares: dict[str, list[float]] = {}
        for scene in pipeline.scenes:
            wanted = pipeline.palette.id_of(SCENE_CLASS[scene])
            for seed in range(args.seeds):
                request = GenerateRequest(
                    mode="free",
                    width=args.size,
                    height=args.size,
                    scene=scene,
                    seed=seed,
                    guidance=guidance,
                )
                result = next(e for e in pipeline.generate(request) if isinstance(e, Result))
                ids = segmenter(result.images[0])
                shares.setdefault(scene, []).append(float((ids == wanted).mean()))
        every = [share for values in shares.values() for share in values]
        line = {
            "guidance": guidance,
            "share": round(float(np.mean(every)), 3),
            "shown": f"{sum(s >= args.enough for s in every)}/{len(every)}",
            "per_scene": {scene: round(float(np.mean(v)), 3) for scene, v in shares.items()},
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
