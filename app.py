"""Open the landscape studio in the browser.

    python app.py                          # bundled models in checkpoints/, on 127.0.0.1:7860
    python app.py --checkpoints DIR --port 8000
    python app.py --tiny                   # untrained tiny models: for tests and demos only

Gradio and torch are imported only after the arguments are read, so --help answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="The landscape studio: paint a layout (or sketch, depth map, small photo) "
        "and watch a VQGAN + transformer paint the picture row by row.",
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=DEFAULT_CHECKPOINTS,
        help="folder of the model bundle (default: checkpoints/ beside this file)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument(
        "--share",
        choices=("yes", "no"),
        default="no",
        help="also open a public Gradio share link (default: no)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="use untrained tiny models instead of checkpoints (fast; for tests and demos — "
        "the pictures are noise)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from core.checkpoint import CheckpointError
    from core.pipeline import Pipeline

    if args.tiny:
        pipeline = Pipeline.tiny()
    else:
        try:
            pipeline = Pipeline.load(args.checkpoints)
        except (CheckpointError, OSError) as error:
            reason = " ".join(str(error).split())  # one line, whatever the message holds
            print(f"error: cannot load the models: {reason}", file=sys.stderr)
            return 2

    from studio.app import launch

    launch(pipeline, host=args.host, port=args.port, share=args.share == "yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
