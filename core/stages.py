"""Entry points of `train.py`: build each stage's data and config, then run its trainer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core.checkpoint import save_checkpoint
from core.condition_stages import SPATIAL_KINDS, ConditionBatches, channels_for, condition_display
from core.config import ConfigError, load_config
from core.data import DataError, PhotoCrops, load_photos, load_rgb, read_folder, read_index
from core.layout_cells import KIND as CELLS_KIND
from core.layout_cells import CellsConfig, LayoutCells
from core.palette import Palette
from core.train_transformer import TransformerTrainConfig, train_transformer
from core.train_vqgan import VQGANTrainConfig, VQGANTrainer, resolve_init, train_vqgan
from core.training import DataConfig, setup_distributed

logger = logging.getLogger(__name__)


def records_for(data: DataConfig):
    """The photo records a data config names: a user's folder, else the index file."""
    if data.folder:
        records = read_folder(data.folder, data.labels, data.edges, data.depth)
    elif data.index:
        records = read_index(data.index, data.split, data.min_nature_share)
    else:
        raise DataError("set data.folder=PATH (your photos) or data.index=PATH (an index.jsonl)")
    return records[: data.limit] if data.limit > 0 else records


class ImageBatches:
    """Stage-1 image batches: the crop is both input and target."""

    def __init__(self, crops: PhotoCrops):
        self.crops = crops

    def batch(self, step: int, size: int):
        images = self.crops.batch(step, size)
        return images, images


def vqgan_card(config: VQGANTrainConfig, records):
    def card(trainer: VQGANTrainer) -> str:
        model = config.model
        sources = sorted({r.source for r in records})
        return "\n".join(
            [
                f"# VQGAN stage 1 ({config.kind})",
                "",
                f"- f = {model.downsample_factor}, codebook {model.codebook_size} × "
                f"{model.code_dim}{' (l2-normalised)' if model.l2_normalized else ''}, "
                f"width {model.channels} × {model.channel_mult}",
                f"- trained {trainer.step} steps, batch {config.run.batch_size}, "
                f"{config.data.crop} px crops",
                f"- data: {len(records)} photos, split '{config.data.split}', "
                f"sources {', '.join(sources)}",
                f"- codebook usage (last {trainer.usage.window} batches): "
                f"{trainer.usage.usage():.3f}, perplexity {trainer.usage.perplexity():.1f}",
                *(
                    [
                        f"- decoder-only fine-tune of `{config.init}`: its encoder and codebook "
                        "are kept bit for bit, so it makes the same tokens"
                    ]
                    if config.decoder_only
                    else []
                ),
                "",
                "Evaluation: see `python -m core.evaluate vqgan --checkpoint <this folder>`.",
            ]
        )

    return card


def run_vqgan(config_path, overrides, resume: bool):
    config = load_config(VQGANTrainConfig, config_path, overrides)
    if config.kind not in ("image", *SPATIAL_KINDS):
        raise ConfigError(
            f"config key 'kind' is '{config.kind}'; expected image, {', '.join(SPATIAL_KINDS)}"
        )
    resolve_init(config)
    ranks = setup_distributed(config.run.ddp_timeout_s)  # joined first: each rank draws its share
    records = records_for(config.data)
    if config.kind == "image":
        images, records = load_photos(records, config.data.crop, config.data.max_short_side)
        crops = PhotoCrops(images, config.data.crop, config.run.seed, ranks.rank, ranks.world)
        batches = ImageBatches(crops)
        return train_vqgan(config, batches, resume, vqgan_card(config, records))
    palette = Palette.default()
    channels = channels_for(config.kind, palette)  # derived, never hand-edited
    config.model.in_channels = config.model.out_channels = channels
    batches = ConditionBatches(
        config.kind, records, config.data.crop, config.run.seed, palette, ranks.rank
    )

    def display(batch):
        return condition_display(config.kind, batch, palette)

    card = vqgan_card(config, batches.records)
    return train_vqgan(config, batches, resume, card, display)


def _tall_enough(record, height: int) -> bool:
    try:
        return load_rgb(record.photo).shape[0] >= height
    except DataError:
        return False


def split_records(config) -> tuple[list, list]:
    """Train and validation records: the index's splits, or 5 % of a user's folder held out."""
    data = config.data
    if data.folder:
        records = records_for(data)
        wanted = max(1, len(records) // 20) if len(records) > 1 else 0
        train, held_out = [], []  # held out: usable photos, so a broken file cannot empty val
        for record in records:
            if len(held_out) < wanted and _tall_enough(record, config.token_height):
                held_out.append(record)
            else:
                train.append(record)
        return train, held_out or records
    train = records_for(data)
    val = read_index(data.index, "val", data.min_nature_share)
    return train, val[: data.limit] if data.limit > 0 else val


def run_transformer(config_path, overrides, resume: bool):
    config = load_config(TransformerTrainConfig, config_path, overrides)
    train, val = split_records(config)
    return train_transformer(config, train, val, resume)


@dataclass
class CellsStageConfig:
    out: str = "runs/layout_cells/checkpoint"
    downsample_factor: int = 16  # the image VQGAN's f


def run_cells(config_path, overrides) -> str:
    """Write the layout cell-grid stage (nothing to train); returns its weights' hash."""
    config = load_config(CellsStageConfig, config_path, overrides)
    classes = Palette.default().num_condition_classes
    try:
        model = LayoutCells(CellsConfig(classes, config.downsample_factor))
    except ValueError as error:
        raise ConfigError(f"config key 'downsample_factor': {error}") from None
    card = "\n".join(
        [
            "# Layout stage: cell grid",
            "",
            f"- one token per {model.factor} × {model.factor} cell: its most frequent class "
            f"({classes} ids: the palette's classes and free); nothing trained",
            "- why: see core/layout_cells.py (86 % of val pixels kept at the token scale, "
            "against 48 % for the layout VQGAN trained 25 CPU minutes)",
            "",
        ]
    )
    sha = save_checkpoint(config.out, CELLS_KIND, model.config, model.state_dict(), card)
    logger.info("layout cell stage written to %s", config.out)
    return sha


def run_stage(stage: str, config_path, overrides, resume: bool):
    if stage == "cells":
        return run_cells(config_path, overrides)
    if stage in ("vqgan", "condition"):  # the same loop; the config's `kind` tells them apart
        return run_vqgan(config_path, overrides, resume)
    if stage == "transformer":
        return run_transformer(config_path, overrides, resume)
    if stage == "bundle":
        from core.bundle import BundleConfig, build_bundle

        return build_bundle(load_config(BundleConfig, config_path, overrides))
    raise ConfigError(f"unknown stage '{stage}'")
