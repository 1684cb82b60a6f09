"""A compact copy of the landscape data pack, for machines where ../shared/data is not at hand.

    python -m core.compact_data --out data_compact [--source ../shared/data/index.jsonl]

Keeps the photos the bundle recipe trains on (nature_share ≥ 0.5, plus every labelled one),
re-encoded as JPEG with the short side at most 192 px, their label maps (PNG, nearest
neighbour), and an index.jsonl of the same form. The quality is lowered until the copy fits
the size budget (50 MiB by default). Configs read it with data.index=data_compact/index.jsonl.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

logger = logging.getLogger("core.compact_data")


def _shrink(image: Image.Image, short_side: int, resample) -> Image.Image:
    width, height = image.size
    scale = short_side / min(width, height)
    if scale >= 1:
        return image
    return image.resize((round(width * scale), round(height * scale)), resample)


def compact(source: Path, out: Path, short_side: int, budget: int, min_nature: float) -> int:
    """Write the copy; returns its size in bytes."""
    root = source.parent
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("nature_share", 1) >= min_nature or r.get("label")]
    photos: list[tuple[dict, Image.Image]] = []
    for row in tqdm(rows, desc="reading", unit="photo"):
        with Image.open(root / row["photo"]) as image:
            photos.append((row, _shrink(image.convert("RGB"), short_side, Image.LANCZOS)))
    for quality in (85, 75, 65, 55, 45):
        encoded = []
        for _, image in photos:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            encoded.append(buffer.getvalue())
        if sum(map(len, encoded)) < 0.85 * budget:  # leave room for label maps and the index
            break
    if out.exists():
        shutil.rmtree(out)
    lines = []
    for (row, image), data in tqdm(list(zip(photos, encoded, strict=True)), desc="writing"):
        copy = {k: v for k, v in row.items() if k not in ("edges_human", "depth")}
        photo = Path(row["photo"]).with_suffix(".jpg")
        (out / photo).parent.mkdir(parents=True, exist_ok=True)
        (out / photo).write_bytes(data)
        copy["photo"] = str(photo)
        copy["width"], copy["height"] = image.size
        for key in ("label", "pseudo"):
            if row.get(key):
                with Image.open(root / row[key]) as labels:
                    small = labels.resize(image.size, Image.NEAREST)
                    (out / row[key]).parent.mkdir(parents=True, exist_ok=True)
                    small.save(out / row[key], optimize=True)
        lines.append(json.dumps(copy))
    (out / "index.jsonl").write_text("\n".join(lines) + "\n")
    for name in ("palette.json", "palette_sources.json", "README.md", "ATTRIBUTION-ml5.tsv"):
        if (root / name).is_file():
            shutil.copy(root / name, out / name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    logger.info(
        "%d photos, JPEG quality %d, %.1f MiB in %s", len(lines), quality, size / 2**20, out
    )
    if size > budget:
        logger.warning(
            "the copy is %.1f MiB, over the %.1f MiB budget", size / 2**20, budget / 2**20
        )
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.compact_data", description=__doc__)
    parser.add_argument("--source", default="../shared/data/index.jsonl", help="index.jsonl")
    parser.add_argument("--out", default="data_compact", help="folder to write")
    parser.add_argument("--short-side", type=int, default=192, help="longest short side, px")
    parser.add_argument("--budget-mib", type=float, default=50.0)
    parser.add_argument("--min-nature-share", type=float, default=0.5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source = Path(args.source)
    if not source.is_file():
        logger.error("%s does not exist; give --source PATH/index.jsonl", source)
        return 2
    budget = int(args.budget_mib * 2**20)
    compact(source, Path(args.out), args.short_side, budget, args.min_nature_share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
