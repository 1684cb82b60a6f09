"""The layout cell-grid stage: majority class per cell, a checkpoint like any stage, a bundle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from test_custom_data import GRASS, SKY, TINY, WATER, train_cli, write_good_photos

from core.checkpoint import CheckpointError
from core.condition_stages import layout_input
from core.layout_cells import CellsConfig, LayoutCells
from core.models import load_stage
from core.palette import Palette

PALETTE = Palette.default()


def cells(factor: int = 4) -> LayoutCells:
    return LayoutCells(CellsConfig(PALETTE.num_condition_classes, factor))


def test_each_cell_takes_its_most_frequent_class_and_ties_go_to_the_lower_id():
    ids = np.full((4, 8), SKY)
    ids[:, 4:] = GRASS
    ids[3, 4:7] = WATER  # right cell: 13 grass, 3 water
    ids[0, 0:2] = WATER  # left cell: 14 sky, 2 water
    wide = np.full((4, 4), WATER)
    wide[:2] = GRASS  # 8 grass, 8 water: a tie
    layout = np.concatenate([ids, wide], axis=1)  # 4 x 12: three cells of 4 x 4

    tokens = cells().encode_indices(layout_input(layout, PALETTE))

    assert tokens.tolist() == [[[SKY, GRASS, GRASS]]]  # GRASS (3) < WATER (7) wins the tie


def test_decoding_fills_every_cell_with_its_class():
    tokens = torch.tensor([[[SKY, WATER], [GRASS, PALETTE.free_id]]])

    one_hot = cells().decode_indices(tokens)

    assert one_hot.shape == (1, PALETTE.num_condition_classes, 8, 8)
    ids = one_hot.argmax(1)[0]
    assert (ids[:4, :4] == SKY).all() and (ids[:4, 4:] == WATER).all()
    assert (ids[4:, :4] == GRASS).all() and (ids[4:, 4:] == PALETTE.free_id).all()
    assert one_hot.sum(1).eq(1).all()


def test_inputs_of_the_wrong_shape_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="not a multiple of f = 4"):
        cells().encode_indices(layout_input(np.full((6, 8), SKY), PALETTE))
    with pytest.raises(ValueError, match="one-hot layouts"):
        cells().encode_indices(torch.zeros(1, 3, 8, 8))


def test_train_py_cells_writes_a_layout_stage_only_a_layout_role_accepts(workdir):
    train_cli("cells", "out=stage", "downsample_factor=8")

    model, sha = load_stage(workdir / "stage", "layout")

    assert isinstance(model, LayoutCells) and model.factor == 8
    assert model.config.codebook_size == PALETTE.num_condition_classes
    assert len(sha) == 64
    with pytest.raises(CheckpointError, match="a edges stage must be vqgan:edges"):
        load_stage(workdir / "stage", "edges")


@pytest.mark.slow
def test_a_transformer_on_layout_cells_bundles_and_generates(workdir):
    from core.pipeline import GenerateRequest, Pipeline, Result
    from core.sampler import grid_for_pixels

    write_good_photos(workdir / "photos", workdir / "labels", 6)
    data = ["data.folder=photos", "data.labels=labels"]
    train_cli("vqgan", "--config", str(TINY / "vqgan.yaml"), *data, "run.steps=2")
    train_cli("cells", "out=cells", "downsample_factor=8")  # the tiny VQGAN's f
    train_cli(
        "transformer", "--config", str(TINY / "transformer.yaml"), *data,
        "stages.layout=cells", "run.steps=4",
    )  # fmt: skip
    train_cli("bundle", "transformer=runs/tiny_transformer/checkpoint", "out=bundle")

    manifest = yaml.safe_load((workdir / "bundle" / "bundle.yaml").read_text())
    assert sorted(manifest["models"]) == ["image", "layout", "transformer"]
    pipeline = Pipeline.load(workdir / "bundle")
    layout = np.full((32, 48), SKY)
    layout[16:, :] = GRASS
    layout[16:24, 8:24] = WATER  # cells (2, 1) and (2, 2) are all water
    request = GenerateRequest("layout", width=48, height=32, condition=layout, seed=2)
    grid = grid_for_pixels(48, 32, pipeline.factor)
    condition = pipeline.condition_tokens(
        request, pipeline.condition_map(request, grid.width, grid.height), grid
    )
    offset = pipeline.vocabulary.offsets["layout"]
    expected = [[SKY] * 6, [SKY] * 6, [GRASS, WATER, WATER, GRASS, GRASS, GRASS], [GRASS] * 6]
    assert (condition.tokens[0] - offset).tolist() == expected

    result = [event for event in pipeline.generate(request) if isinstance(event, Result)][0]
    assert result.images[0].shape == (32, 48, 3)

    # Guidance steers away from an unpainted layout: every cell free (id 13, after the 13
    # palette classes 0..12), sampled beside the painted one.
    guided = replace(request, guidance=2.0)
    condition = pipeline.condition_tokens(
        guided, pipeline.condition_map(guided, grid.width, grid.height), grid
    )
    assert (condition.unguided[0] - offset).tolist() == [[13] * 6] * 4
    result = [event for event in pipeline.generate(guided) if isinstance(event, Result)][0]
    assert result.images[0].shape == (32, 48, 3)
