"""Assembling a bundle: the trained transformer and the exact stages it was trained with.

`python train.py bundle transformer=runs/transformer/checkpoint out=checkpoints` copies every
model into one folder (fp16 by default), re-records in the transformer which stage weights it
belongs with, adds the data terms to each card and writes the manifest `bundle.yaml`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    tokens_sha256,
    write_manifest,
)
from core.layout_cells import KIND as CELLS_KIND

logger = logging.getLogger(__name__)

DATA_TERMS = """
## Data and terms

Trained on the landscape data pack (`../shared/data`): ml5 "landscapes" from Flickr (each photo
under its own CC licence; attribution in the pack's ATTRIBUTION-ml5.tsv), S-FLCKR examples,
ADE20K, COCO 2017, Open Images, CamVid, BSDS500 and D-RIN examples (ImageNet). Several sources
allow research and non-commercial use only (CamVid, BSDS500, ImageNet, ADE20K), so this model
is for research and non-commercial use.
"""


@dataclass
class BundleConfig:
    transformer: str = "runs/transformer/checkpoint"
    out: str = "checkpoints"
    name: str = "landscape"
    half: bool = True  # store weights as fp16 (half the size; loads back into fp32 models)
    # Another image VQGAN than the one the transformer was trained with: it must make the same
    # tokens (a decoder-only fine-tune of it, `train.py vqgan init=... decoder_only=true`).
    image: str = ""


def _copy_model(source: Path, target: Path, half: bool, notes: str) -> str:
    checkpoint = load_checkpoint(source)
    card = (source / "card.md").read_text() if (source / "card.md").is_file() else ""
    trained = checkpoint.kind != CELLS_KIND  # the cell grid learned nothing from any data
    if trained and DATA_TERMS.strip() not in card:
        card = card.rstrip() + "\n" + notes + DATA_TERMS
    return save_checkpoint(
        target,
        checkpoint.kind,
        checkpoint.model,
        checkpoint.state,
        card,
        extra=checkpoint.extra,
        half=half,
    )


def build_bundle(config: BundleConfig) -> Path:
    """Write the bundle folder; returns it."""
    out = Path(config.out)
    transformer = load_checkpoint(config.transformer, kind="transformer")
    folders = transformer.extra.get("stage_folders", {})
    recorded = transformer.extra.get("stages", {})
    size_note = "\nWeights stored as fp16.\n" if config.half else "\n"
    bundled_hashes = {}
    for role, sha in recorded.items():
        source = Path(config.image if role == "image" and config.image else folders.get(role, ""))
        if not source.is_dir():
            raise CheckpointError(
                f"the transformer was trained with the '{role}' stage from '{source}', which is "
                "gone; bundle it where its stages are, or retrain the transformer"
            )
        if tokens_sha256(load_checkpoint(source)) != sha:
            raise CheckpointError(
                f"{source} makes other tokens than the stage the transformer was trained on "
                "(hash differs); retrain the transformer on it or restore the stage"
            )
        bundled_hashes[role] = _copy_model(source, out / role, config.half, size_note)
        logger.info("bundled %s from %s", role, source)
    extra = dict(transformer.extra)
    extra.update(stages=bundled_hashes, name=config.name)
    extra.pop("stage_folders", None)
    card = (Path(config.transformer) / "card.md").read_text()
    if DATA_TERMS.strip() not in card:
        card = card.rstrip() + "\n" + size_note + DATA_TERMS
    save_checkpoint(
        out / "transformer",
        "transformer",
        transformer.model,
        transformer.state,
        card,
        extra=extra,
        half=config.half,
    )
    write_manifest(out, {"transformer": "transformer", **{role: role for role in bundled_hashes}})
    total = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    logger.info("bundle %s written: %.1f MB of weights", out, total / 1e6)
    return out
