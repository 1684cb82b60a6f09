"""Tests for depth, edge and low-resolution conditions."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core.conditions import (
    ConditionError,
    back_project,
    canny_edges,
    compare_with_midas,
    depth_from_array,
    downsample,
    edge_f_score,
    estimate_depth_from_layout,
    load_depth,
    load_human_edges,
    sketch_to_edges,
    upsample_bicubic,
)

INDEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "index.jsonl"

SKY, TREE, GRASS = 1, 2, 3


def _gradient() -> np.ndarray:
    """8 rows of a left-to-right ramp 0, 0.01, …, 1 (101 columns)."""
    return np.tile(np.linspace(0.0, 1.0, 101), (8, 1))


def _expected_gradient() -> np.ndarray:
    # The 1st and 99th percentiles of the ramp are 0.01 and 0.99; they map to 0 and 1.
    return np.clip((_gradient() - 0.01) / 0.98, 0.0, 1.0)


def test_depth_files_of_every_format_load_to_the_same_map(tmp_path: Path) -> None:
    ramp = _gradient()
    Image.fromarray(np.round(ramp * 255).astype(np.uint8)).save(tmp_path / "d8.png")
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "d16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "d.tif")
    np.save(tmp_path / "d.npy", ramp * 7.5 + 2.0)  # any affine scale: normalised per image

    for name, tolerance in [
        ("d8.png", 1.5 / 255),
        ("d16.png", 1e-4),
        ("d.tif", 1e-5),
        ("d.npy", 1e-5),
    ]:
        depth = load_depth(tmp_path / name)
        assert depth.dtype == np.float32
        assert np.allclose(depth, _expected_gradient(), atol=tolerance), name


def test_a_constant_depth_map_gives_zeros_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="core.conditions"):
        depth = depth_from_array(np.full((4, 5), 0.7))
    assert np.array_equal(depth, np.zeros((4, 5), dtype=np.float32))
    assert "constant" in caplog.text


def test_an_unreadable_depth_file_names_the_file_and_the_formats(tmp_path: Path) -> None:
    broken = tmp_path / "depth.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ConditionError, match=r"depth\.png.*16-bit greyscale PNG"):
        load_depth(broken)


def test_layout_depth_puts_sky_far_and_the_bottom_near() -> None:
    layout = np.full((40, 60), GRASS)
    layout[:16] = SKY
    layout[10:30, 20:30] = TREE

    depth = estimate_depth_from_layout(layout, rng=np.random.default_rng(0))

    assert depth.dtype == np.float32
    assert depth.min() >= 0.0 and depth.max() <= 1.0
    assert depth[:8].mean() < 0.1
    assert depth[-3:].mean() > 0.8
    assert depth[:8].mean() < depth[20:24, 40:].mean() < depth[-3:].mean()


def test_a_tree_standing_low_in_the_frame_is_nearer_than_one_on_the_horizon() -> None:
    layout = np.full((60, 80), GRASS)
    layout[:20] = SKY
    layout[10:24, 5:15] = TREE  # stands just below the horizon
    layout[25:50, 60:70] = TREE  # stands on the ground near the camera

    depth = estimate_depth_from_layout(layout, smoothing=0.0)

    assert depth[22, 10] < depth[30, 65]


@pytest.mark.skipif(not INDEX.exists(), reason="the shared data pack is not here")
def test_layout_depth_correlates_with_midas_on_the_drin_photos() -> None:
    mean, scores = compare_with_midas(INDEX)
    assert len(scores) == 25
    assert mean > 0.35  # measured 0.44 with the default heuristic


def test_canny_marks_the_border_of_a_square_and_not_its_inside() -> None:
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    image[10:30, 10:30] = 255

    edges = canny_edges(image)

    assert set(np.unique(edges)) == {0, 255}
    assert edges[9:12, 20].max() == 255
    assert edges[20, 20] == 0
    assert edges[2, 2] == 0


def test_thick_dark_strokes_on_white_become_thin_centre_lines() -> None:
    sketch = Image.new("RGB", (120, 90), "white")
    ImageDraw.Draw(sketch).line([(10, 45), (110, 45)], fill=(20, 20, 20), width=13)

    edges = sketch_to_edges(np.asarray(sketch))

    assert set(np.unique(edges)) == {0, 255}
    assert edges[44:47, 60].max() == 255  # the stroke's centre line
    assert (edges[:, 60] > 0).sum() <= 2  # thin, though the stroke is 13 px wide
    assert edges[10, 60] == 0


def test_thin_light_strokes_on_black_stay_where_they_are() -> None:
    sketch = Image.new("L", (120, 90), 0)
    ImageDraw.Draw(sketch).line([(60, 5), (60, 85)], fill=230, width=1)

    edges = sketch_to_edges(np.asarray(sketch))

    assert edges[45, 60] == 255
    assert (edges[45] > 0).sum() == 1
    assert edges[45, 20] == 0


def test_a_blank_sketch_has_no_edges() -> None:
    assert not sketch_to_edges(np.full((16, 16), 250, dtype=np.uint8)).any()


def test_human_edge_maps_keep_agreed_boundaries_thinned(tmp_path: Path) -> None:
    soft = np.zeros((30, 40), dtype=np.uint8)
    soft[14:17, :] = 128  # half the annotators, a 3-pixel band
    soft[:, 8] = 42  # one annotator in six
    Image.fromarray(soft).save(tmp_path / "edges.png")

    edges = load_human_edges(tmp_path / "edges.png", threshold=0.25)

    assert (edges[:, 25] > 0).sum() == 1
    assert edges[14:17, 25].max() == 255
    assert not edges[:10, 8].any()


def test_edge_f_score_is_one_for_a_map_with_itself_and_zero_against_nothing() -> None:
    edges = np.zeros((20, 20), dtype=np.uint8)
    edges[5, 2:18] = 255
    assert edge_f_score(edges, edges) == 1.0
    assert edge_f_score(edges, np.zeros_like(edges)) == 0.0


def test_edge_f_score_forgives_a_shift_within_the_tolerance() -> None:
    target = np.zeros((20, 20), dtype=np.uint8)
    target[5, 2:18] = 255
    shifted = np.roll(target, 2, axis=0)
    assert edge_f_score(shifted, target, tolerance_px=2) == 1.0
    assert edge_f_score(shifted, target, tolerance_px=1) == 0.0


def test_downsampling_averages_fine_detail_instead_of_aliasing() -> None:
    checker = ((np.indices((64, 48)).sum(axis=0) % 2) * 255).astype(np.uint8)
    image = np.repeat(checker[..., None], 3, axis=2)

    small = downsample(image, 4)

    assert small.shape == (16, 12, 3)
    assert np.abs(small[2:-2, 2:-2].astype(int) - 128).max() <= 3


def test_upsample_bicubic_takes_width_then_height() -> None:
    image = np.zeros((8, 12, 3), dtype=np.uint8)
    assert upsample_bicubic(image, (48, 32)).shape == (32, 48, 3)
    assert upsample_bicubic(np.zeros((8, 12), np.float32), (24, 16)).shape == (16, 24)


def test_back_projection_brings_a_wrong_enlargement_back_to_the_small_photo() -> None:
    # A 16x16 photo: left half red (200, 40, 40), right half blue (40, 40, 200).
    small = np.zeros((16, 16, 3), dtype=np.uint8)
    small[:, :8] = (200, 40, 40)
    small[:, 8:] = (40, 40, 200)
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)  # an "enlargement" that lost the colours
    result = back_project(grey, small, 4)
    # More than the filters' reach (12 px) from the colour border at column 32, the result has
    # the photo's colours
    assert np.abs(result[:, :20].astype(int) - (200, 40, 40)).max() <= 3
    assert np.abs(result[:, 44:].astype(int) - (40, 40, 200)).max() <= 3


def test_back_projection_keeps_detail_finer_than_the_small_photo() -> None:
    # A flat grey photo and an enlargement with a fine checkerboard of +-20 on grey 128: the
    # checkerboard averages out when shrunk, so back-projection must leave it in place.
    small = np.full((8, 8, 3), 128, dtype=np.uint8)
    checker = (np.indices((32, 32)).sum(axis=0) % 2 * 40 + 108).astype(np.uint8)
    enlarged = np.repeat(checker[..., None], 3, axis=2)
    result = back_project(enlarged, small, 4)
    assert np.abs(result.astype(int) - enlarged.astype(int)).max() <= 4


def test_back_projection_refuses_an_image_that_is_not_the_enlargement() -> None:
    with pytest.raises(ConditionError, match="not ×4 of a 16×16"):
        back_project(np.zeros((60, 64, 3), np.uint8), np.zeros((16, 16, 3), np.uint8), 4)
