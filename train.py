"""Train any stage of the studio's models.

    python train.py vqgan --config configs/vqgan.yaml run.name=vqgan run.minutes=60
    python train.py vqgan --config configs/vqgan.yaml run.name=vqgan --resume
    torchrun --nproc-per-node 2 train.py vqgan ...      (data parallel; gloo on CPU)

Every stage takes a YAML config (typed; see core/*.py for the fields) and `key=value`
overrides. Runs live in runs/<run.name>/ with state.pt, metrics.jsonl, samples/ and a
checkpoint/ folder the app can load.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

STAGES = ("vqgan", "condition", "cells", "transformer", "bundle")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the studio's models: the image VQGAN, condition stages and the "
        "transformer, or assemble a bundle the app can load.",
        epilog="Overrides are key=value pairs, e.g. run.name=mine run.minutes=30 "
        "data.folder=~/photos model.codebook_size=512",
    )
    parser.add_argument("stage", choices=STAGES, help="what to train")
    parser.add_argument("--config", help="YAML config file (defaults are used when omitted)")
    parser.add_argument("--resume", action="store_true", help="continue runs/<name>/state.pt")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, other ranks log warnings only
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if is_main else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from core.checkpoint import CheckpointError
    from core.config import ConfigError
    from core.data import DataError
    from core.stages import run_stage
    from core.training import TrainingError

    try:
        run_stage(args.stage, args.config, args.overrides, args.resume)
    except (CheckpointError, ConfigError, DataError, TrainingError) as error:
        logging.getLogger("train").error("%s", error)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("train").warning("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
