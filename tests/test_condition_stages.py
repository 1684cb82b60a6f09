"""Condition-stage training data from a user's folders: their own edge and depth maps are used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.condition_stages import ConditionBatches
from core.data import read_folder
from core.palette import Palette


def make_folders(root: Path) -> tuple[Path, Path, Path]:
    photos, edges, depth = root / "photos", root / "edges", root / "depth"
    for folder in (photos, edges, depth):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            photos / f"{name}.png"
        )
        lines = np.zeros((64, 64), np.uint8)
        lines[32, :] = 255  # one horizontal stroke across the middle
        Image.fromarray(lines).save(edges / f"{name}.png")
        ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16)[:, None], (1, 64))
        Image.fromarray(ramp).save(depth / f"{name}.png")  # 16-bit, near at the bottom
    return photos, edges, depth


def test_edges_stage_takes_the_users_edge_maps_over_canny(tmp_path: Path):
    photos, edges, _ = make_folders(tmp_path)
    records = read_folder(photos, edges=edges)
    batches = ConditionBatches("edges", records, crop=64, seed=0, palette=Palette.default())
    inputs, _ = batches.batch(step=0, size=2)
    strokes = inputs[:, 0] > 0  # the stroke, thickened to 3 px
    assert strokes.sum(dim=(1, 2)).tolist() == [3 * 64, 3 * 64]
    assert strokes[:, 31:34, :].all()


def test_depth_stage_takes_the_users_depth_maps_without_labels(tmp_path: Path):
    photos, _, depth = make_folders(tmp_path)
    records = read_folder(photos, depth=depth)
    batches = ConditionBatches("depth", records, crop=64, seed=0, palette=Palette.default())
    inputs, _ = batches.batch(step=0, size=1)
    column = inputs[0, 0, :, 0]
    assert float(column[0]) < -0.9 and float(column[-1]) > 0.9  # far at the top, near below


def test_edges_and_depth_stages_train_a_few_steps_and_round_trip(tmp_path: Path):
    import train
    from core.models import load_vqgan

    photos, edges, depth = make_folders(tmp_path)
    for kind in ("edges", "depth"):
        argv = [
            "condition",
            "--config",
            "configs/tiny/layout.yaml",  # tiny sizes; kind and folders overridden below
            f"kind={kind}",
            f"data.folder={photos}",
            f"data.{kind}={edges if kind == 'edges' else depth}",
            f"run.out={tmp_path / 'runs'}",
            f"run.name={kind}",
            "run.steps=3",
            "run.bf16=false",
        ]
        assert train.main(argv) == 0
        model, _ = load_vqgan(tmp_path / "runs" / kind / "checkpoint", kind)
        assert (model.config.in_channels, model.config.out_channels) == (1, 1)
        output, _ = model(torch.zeros(1, 1, 32, 32))
        assert output.shape == (1, 1, 32, 32)


def test_condition_and_image_grids_align_for_sizes_off_the_token_grid():
    from core.pipeline import GenerateRequest, Pipeline, Result
    from core.sampler import grid_for_pixels

    pipeline = Pipeline.tiny()
    ids = np.full((100, 130), 1)
    ids[60:] = 3  # sky above grass, 130×100: not a multiple of 16 either way
    request = GenerateRequest(mode="layout", width=130, height=100, condition=ids)
    grid = grid_for_pixels(130, 100, pipeline.factor)
    cond_map = pipeline.condition_map(request, grid.width, grid.height)
    condition = pipeline.condition_tokens(request, cond_map, grid)
    assert condition.tokens.shape == (1, 7, 9)  # ceil(100/16) × ceil(130/16), like the image
    result = [event for event in pipeline.generate(request) if isinstance(event, Result)][0]
    assert result.tokens.shape == (1, 7, 9)
    assert result.images[0].shape == (100, 130, 3)  # cropped back to the canvas
