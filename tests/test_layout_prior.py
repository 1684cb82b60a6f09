"""The class prior on image codes: counting, storing, and steering layout sampling."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import Record
from core.layout_prior import cell_majority, count_codes, load_prior, save_prior
from core.palette import Palette
from core.pipeline import GenerateRequest, Pipeline, Result

SKY, WATER, UNKNOWN = 1, 7, 0
PALETTE = Palette.default()
FREE = PALETTE.free_id


def test_a_cell_counts_for_the_class_that_covers_enough_of_it():
    ids = np.array(
        [
            [SKY, SKY, WATER, WATER, SKY, SKY, UNKNOWN, UNKNOWN],
            [SKY, SKY, WATER, SKY, WATER, WATER, UNKNOWN, UNKNOWN],
            [FREE, FREE, SKY, SKY, SKY, SKY, SKY, SKY],
            [FREE, FREE, SKY, SKY, WATER, WATER, WATER, SKY],
        ]
    )
    # 2×2 cells: all sky | 3 water of 4 | 2 and 2 | unknown // free | sky | 2 and 2 | 3 sky of 4
    assert cell_majority(ids, 2, 0.6, PALETTE).tolist() == [[1, 7, -1, -1], [-1, 1, -1, 1]]
    # with no cover needed a tie goes to the lower id; unknown and free never count
    assert cell_majority(ids, 2, 0.0, PALETTE).tolist() == [[1, 7, 1, -1], [-1, 1, 1, 1]]


def test_the_stored_counts_give_smoothed_log_probabilities(tmp_path: Path):
    counts = np.array([[3, 1], [0, 0]])  # code 0: class 0 three times, class 1 once; code 1: never
    save_prior(tmp_path / "prior.safetensors", counts, "abc")

    table = load_prior(tmp_path / "prior.safetensors", "abc")

    assert table.shape == (2, 2)  # classes × codes
    expected = [[math.log(4 / 6), math.log(1 / 2)], [math.log(2 / 6), math.log(1 / 2)]]
    torch.testing.assert_close(table, torch.tensor(expected))


def test_counts_made_with_other_tokens_are_ignored_with_a_warning(tmp_path: Path, caplog):
    save_prior(tmp_path / "prior.safetensors", np.ones((2, 2)), "old-tokens")
    with caplog.at_level(logging.WARNING):
        assert load_prior(tmp_path / "prior.safetensors", "new-tokens") is None
    assert "other image tokens" in caplog.text


def test_codes_are_counted_under_the_class_of_their_cell(tmp_path: Path):
    pipeline = Pipeline.tiny()
    photo = tmp_path / "lake.png"
    label = tmp_path / "lake_label.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (160, 64, 3), dtype=np.uint8)).save(photo)
    ids = np.full((160, 64), SKY, dtype=np.uint8)
    ids[96:] = WATER  # rows 6–9 of the 10 token rows
    Image.fromarray(ids, mode="L").save(label)

    counts = count_codes([Record(photo, label)], pipeline.image_model, PALETTE)

    columns = 64 // 16
    assert counts[:, SKY].sum() == 6 * columns * 2  # each cell of the photo and of its mirror
    assert counts[:, WATER].sum() == 4 * columns * 2
    assert counts.sum() == 10 * columns * 2


def test_the_prior_steers_painted_cells_toward_their_codes():
    pipeline = Pipeline.tiny()
    vocab = pipeline.image_model.config.codebook_size
    table = torch.full((PALETTE.num_classes, vocab), -20.0)
    table[WATER, 3] = 0.0  # under water, only code 3 is ever seen
    pipeline.layout_prior = table
    layout = np.full((64, 64), WATER, dtype=np.uint8)
    layout[:, 32:] = FREE

    def tokens(prior: float) -> np.ndarray:
        request = GenerateRequest("layout", 64, 64, layout, seed=1, guidance=1.0, prior=prior)
        result = [event for event in pipeline.generate(request) if isinstance(event, Result)][0]
        return np.asarray(result.tokens)[0]

    steered, plain = tokens(2.0), tokens(0.0)
    assert (steered[:, :2] == 3).all()  # the painted half
    assert not (plain[:, :2] == 3).all()
    assert not (steered[:, 2:] == 3).all()  # free cells are left alone


def test_a_bundle_without_counts_records_the_prior_as_off():
    layout = np.full((32, 32), WATER, dtype=np.uint8)
    request = GenerateRequest("layout", 32, 32, layout, prior=3.0)
    events = list(Pipeline.tiny().generate(request))
    assert events[-1].settings["prior"] == 0.0  # so restoring the PNG gives what was used


def test_the_prior_is_recorded_only_where_it_acts():
    pipeline = Pipeline.tiny()
    pipeline.layout_prior = torch.zeros(PALETTE.num_classes, 64)  # a bundle with counts
    layout = np.full((32, 32), WATER, dtype=np.uint8)
    assert pipeline.prior_in_use(GenerateRequest("layout", 32, 32, layout, prior=2.5)) == 2.5
    assert pipeline.prior_in_use(GenerateRequest("free", 32, 32, prior=2.5)) == 0.0
    events = list(pipeline.generate(GenerateRequest("free", 32, 32, prior=2.5)))
    assert events[-1].settings["prior"] == 0.0


@pytest.mark.parametrize("prior", [-1.0, 6.0])
def test_the_cli_refuses_a_prior_outside_its_range(prior):
    from core.sample import main

    with pytest.raises(SystemExit) as stop:
        main(["--prior", str(prior)])
    assert stop.value.code == 2


def test_the_command_needs_photos_with_label_maps(tmp_path: Path, caplog):
    from core.layout_prior import main

    Image.new("RGB", (200, 200)).save(tmp_path / "a.png")
    bundle = Path(__file__).resolve().parent.parent / "checkpoints"
    assert main(["--checkpoints", str(bundle), "--folder", str(tmp_path)]) == 2
    assert "give --labels" in caplog.text
