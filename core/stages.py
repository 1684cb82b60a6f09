"""Entry points of `train.py`: build each stage's data and config, then run its trainer."""

from __future__ import annotations

import logging

from core.config import load_config
from core.data import PhotoCrops, load_photos, read_folder, read_index
from core.train_vqgan import VQGANTrainConfig, VQGANTrainer, train_vqgan
from core.training import DataConfig

logger = logging.getLogger(__name__)


def records_for(data: DataConfig):
    """The photo records a data config names: a user's folder, else the index file."""
    if data.folder:
        return read_folder(data.folder, data.labels, data.edges, data.depth)
    if not data.index:
        from core.data import DataError

        raise DataError("set data.folder=PATH (your photos) or data.index=PATH (an index.jsonl)")
    return read_index(data.index, data.split, data.min_nature_share)


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
                "",
                "Evaluation: see `python -m core.evaluate vqgan --checkpoint <this folder>`.",
            ]
        )

    return card


def run_vqgan(config_path, overrides, resume: bool):
    config = load_config(VQGANTrainConfig, config_path, overrides)
    if config.kind != "image":
        from core.condition_stages import run_condition_stage

        return run_condition_stage(config, resume)
    records = records_for(config.data)
    images, records = load_photos(records, config.data.crop, config.data.max_short_side)
    crops = PhotoCrops(images, config.data.crop, config.run.seed)
    return train_vqgan(config, ImageBatches(crops), resume, vqgan_card(config, records))


def run_stage(stage: str, config_path, overrides, resume: bool):
    if stage == "vqgan":
        return run_vqgan(config_path, overrides, resume)
    raise NotImplementedError(f"stage '{stage}' is not available yet")
