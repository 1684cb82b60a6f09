"""The class prior on image codes: how often each VQGAN code covers each layout class.

    python -m core.layout_prior --checkpoints checkpoints [--index ../shared/data/index.jsonl]
    python -m core.layout_prior --checkpoints my_bundle --folder my_photos --labels my_labels

Encodes the labelled training photos (160 px high, as the transformer saw them, and their
mirrors) with the bundle's image VQGAN and counts, for every token cell that one class covers
for the most part, which code the photo has there. The bundle keeps the counts in
`layout_prior.safetensors`; in layout mode the pipeline adds `prior × log P(class | code)` to
the transformer's logits at every cell painted with that class (the studio's "Class prior"),
which steers each painted region toward codes that look like its class. The counts name the
image VQGAN's tokens they were made with and are ignored, with a warning, by any other.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from core.checkpoint import CheckpointError
from core.data import DEFAULT_INDEX, DataError, Record, load_rgb, read_folder, read_index, to_tensor
from core.palette import LayoutError, Palette, load_label_map

logger = logging.getLogger(__name__)

PRIOR_FILE = "layout_prior.safetensors"
HEIGHT = 160  # px: the transformer's token height (configs/transformer.yaml)
COVER = 0.6  # a cell counts for a class when the class covers at least this share of it
SMOOTHING = 1.0  # added to every count (unseen code: every class equally likely)


def cell_majority(ids: np.ndarray, factor: int, cover: float, palette: Palette) -> np.ndarray:
    """Per token cell of an id map (H, W multiples of factor): the class covering at least
    `cover` of it, or -1 (mixed cells, unknown, free)."""
    grid_h, grid_w = ids.shape[0] // factor, ids.shape[1] // factor
    cells = ids[: grid_h * factor, : grid_w * factor].reshape(grid_h, factor, grid_w, factor)
    cells = cells.transpose(0, 2, 1, 3).reshape(grid_h, grid_w, factor * factor)
    counts = np.stack([(cells == c).sum(-1) for c in range(palette.free_id + 1)], axis=-1)
    majority = counts.argmax(-1)
    enough = counts.max(-1) >= cover * factor * factor
    real = (majority > 0) & (majority < palette.free_id)
    return np.where(enough & real, majority, -1).astype(np.int64)


@torch.no_grad()
def count_codes(records: list[Record], image_model, palette: Palette) -> np.ndarray:
    """Counts [codebook size, classes] of code-under-class over the labelled records."""
    factor = image_model.factor
    counts = np.zeros((image_model.config.codebook_size, palette.num_classes), dtype=np.int64)
    for record in tqdm(records, desc="counting codes per class", unit="photo"):
        if record.label is None:
            continue
        try:
            photo = load_rgb(record.photo)
            ids = load_label_map(record.label, palette).astype(np.uint8)
        except (DataError, LayoutError, OSError) as error:
            logger.warning("skipping %s: %s", record.photo.name, error)
            continue
        width = round(photo.shape[1] * HEIGHT / photo.shape[0]) // factor * factor
        if photo.shape[0] < HEIGHT or width < factor:
            continue
        photo = np.asarray(Image.fromarray(photo).resize((width, HEIGHT), Image.LANCZOS))
        ids = np.asarray(Image.fromarray(ids).resize((width, HEIGHT), Image.NEAREST))
        mirrored = np.ascontiguousarray(photo[:, ::-1])
        both = image_model.encode_indices(to_tensor([photo, mirrored])).numpy()
        for codes, layout in zip(both, (ids, ids[:, ::-1]), strict=True):
            classes = cell_majority(layout, factor, COVER, palette)
            covered = classes >= 0
            np.add.at(counts, (codes[covered], classes[covered]), 1)
    return counts


def save_prior(path: Path, counts: np.ndarray, tokens_from: str) -> None:
    tensors = {"counts": torch.from_numpy(counts.astype(np.float32))}
    save_file(tensors, str(path), metadata={"tokens_from": tokens_from})


def load_prior(path: Path, tokens_from: str) -> torch.Tensor | None:
    """log P(class | code) as a [classes, codebook size] table, or None when the counts were
    made with other tokens (a warning says so)."""
    try:
        with safe_open(str(path), framework="pt") as stored:
            made_with = (stored.metadata() or {}).get("tokens_from")
            counts = stored.get_tensor("counts").double()
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: cannot read the layout prior ({error})") from None
    if made_with != tokens_from:
        logger.warning(
            "%s was counted with other image tokens; the class prior is off (rebuild it with "
            "python -m core.layout_prior)",
            path,
        )
        return None
    smoothed = counts + SMOOTHING
    return (smoothed / smoothed.sum(dim=1, keepdim=True)).log().T.float().contiguous()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.layout_prior", description=__doc__)
    parser.add_argument("--checkpoints", default="checkpoints", help="bundle folder")
    parser.add_argument("--index", default=str(DEFAULT_INDEX), help="the data's index.jsonl")
    parser.add_argument("--folder", help="a folder of photos instead of the index")
    parser.add_argument("--labels", help="with --folder: label maps named like the photos")
    parser.add_argument("--split", default="train")
    parser.add_argument("--min-nature-share", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from core.pipeline import Pipeline  # it imports this module

    try:
        folder = Path(args.checkpoints)
        pipeline = Pipeline.load(folder)  # its palette is the one the transformer learnt
        if args.folder:
            records = read_folder(args.folder, args.labels)
        else:
            records = read_index(args.index, args.split, args.min_nature_share)
        if not any(record.label is not None for record in records):
            raise DataError(
                "no photo has a label map, and the prior counts codes under classes: give "
                "--labels, a folder of label maps named like the photos"
            )
    except (CheckpointError, DataError) as error:
        logger.error("%s", error)
        return 2
    counts = count_codes(records, pipeline.image_model, pipeline.palette)
    save_prior(folder / PRIOR_FILE, counts, pipeline.image_tokens)
    logger.info(
        "wrote %s: %d cells from %d photos", folder / PRIOR_FILE, counts.sum(), len(records)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
