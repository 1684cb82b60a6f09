"""Tests for the painting palette: snapping canvases to ids, label maps, fill and free regions."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core.palette import (
    FREE_ID,
    LayoutError,
    Palette,
    check_layout,
    flood_fill,
    ids_to_rgb,
    load_label_map,
    random_free_regions,
    rgb_to_ids,
)

SHARED_PALETTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "palette.json"

SKY, TREE, GRASS, SNOW, FREE = 1, 2, 3, 9, 13
WHITE = (255, 255, 255)


def _anti_aliased(canvas: Image.Image, factor: int = 4) -> np.ndarray:
    """Shrink a canvas drawn large with Lanczos, so stroke edges blend as in a browser."""
    size = (canvas.width // factor, canvas.height // factor)
    return np.asarray(canvas.resize(size, Image.Resampling.LANCZOS))


def test_free_id_follows_the_thirteen_classes() -> None:
    palette = Palette.default()
    assert palette.num_classes == 13
    assert palette.free_id == FREE_ID == 13
    assert palette.num_condition_classes == 14
    assert palette.names[palette.free_id - 1] == "object"
    assert palette.free_colour not in palette.colours


@pytest.mark.skipif(not SHARED_PALETTE.exists(), reason="the shared data pack is not here")
def test_embedded_palette_matches_the_data_pack() -> None:
    assert Palette.from_json(SHARED_PALETTE) == Palette.default()


def test_anti_aliased_strokes_snap_to_the_painted_classes() -> None:
    canvas = Image.new("RGB", (256, 192), (135, 206, 235))  # sky
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 120, 255, 191], fill=(124, 252, 0))  # grass
    draw.ellipse([80, 40, 180, 150], fill=(34, 139, 34))  # tree
    pixels = _anti_aliased(canvas)
    assert len({tuple(p) for p in pixels.reshape(-1, 3)}) > 3  # edges really blend

    ids = rgb_to_ids(pixels)

    assert set(np.unique(ids)) == {SKY, TREE, GRASS}
    assert ids[2, 2] == SKY
    assert ids[24, 32] == TREE
    assert ids[45, 5] == GRASS


def test_white_paper_is_free_not_snow_when_it_is_the_background() -> None:
    canvas = Image.new("RGB", (128, 128), WHITE)
    ImageDraw.Draw(canvas).ellipse([32, 32, 96, 96], fill=(135, 206, 235))
    pixels = _anti_aliased(canvas)

    on_paper = rgb_to_ids(pixels, background=WHITE)
    uploaded = rgb_to_ids(pixels)

    assert set(np.unique(on_paper)) == {SKY, FREE}
    assert on_paper[2, 2] == FREE
    assert on_paper[16, 16] == SKY
    assert uploaded[2, 2] == SNOW


def test_transparent_pixels_are_free() -> None:
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[..., :3] = (34, 139, 34)
    pixels[:, :4, 3] = 255
    pixels[:, 4:, 3] = 40

    ids = rgb_to_ids(pixels)

    assert (ids[:, :4] == TREE).all()
    assert (ids[:, 4:] == FREE).all()


def test_every_id_survives_a_round_trip_through_colours() -> None:
    ids = np.arange(14, dtype=np.int64).reshape(2, 7)
    assert np.array_equal(rgb_to_ids(ids_to_rgb(ids)), ids)


def test_ids_outside_the_palette_become_unknown_with_one_counted_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = np.full((40, 40), GRASS, dtype=np.uint8)
    flat = ids.reshape(-1)
    flat[:1000] = 255
    flat[1000:1234] = 14
    Image.fromarray(ids).save(tmp_path / "layout.png")

    with caplog.at_level(logging.WARNING, logger="core.palette"):
        loaded = load_label_map(tmp_path / "layout.png")

    assert (loaded.reshape(-1)[:1234] == 0).all()
    assert (loaded.reshape(-1)[1234:] == GRASS).all()
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1,234 pixels" in warnings[0].getMessage()


def test_a_layout_of_only_free_pixels_is_rejected() -> None:
    with pytest.raises(LayoutError, match="paint at least one class"):
        check_layout(np.full((4, 4), FREE))
    check_layout(np.array([[FREE, SKY]]))


def test_flood_fill_changes_only_the_connected_region() -> None:
    ids = np.array(
        [
            [SKY, SKY, TREE, SKY],
            [SKY, TREE, TREE, SKY],
            [TREE, GRASS, GRASS, SKY],
        ]
    )
    filled = flood_fill(ids, (0, 0), SNOW)  # (x, y): the top-left sky patch

    expected = np.array(
        [
            [SNOW, SNOW, TREE, SKY],
            [SNOW, TREE, TREE, SKY],
            [TREE, GRASS, GRASS, SKY],
        ]
    )
    assert np.array_equal(filled, expected)
    assert ids[0, 0] == SKY  # the input is left alone


def test_random_free_regions_sometimes_keep_and_sometimes_free_most() -> None:
    ids = np.full((32, 48), GRASS)
    rng = np.random.default_rng(0)
    free_shares = [(random_free_regions(ids, rng) == FREE).mean() for _ in range(60)]
    results = {int(v) for v in np.unique(random_free_regions(ids, rng))}

    assert results <= {GRASS, FREE}
    assert min(free_shares) == 0.0
    assert max(free_shares) > 0.5
    assert any(0.0 < share < 1.0 for share in free_shares)


def test_a_photo_is_refused_as_a_layout_but_a_jpeg_of_one_is_read(tmp_path: Path):
    palette = Palette.default()
    ids = np.full((64, 96), 1, dtype=np.int64)  # sky
    ids[32:] = 7  # water
    ids[40:, :30] = 5  # mountain
    Image.fromarray(ids_to_rgb(ids, palette)).save(tmp_path / "layout.jpg", quality=75)
    read = load_label_map(tmp_path / "layout.jpg", palette)
    assert (read == ids).mean() > 0.95

    # smooth, photo-like colours: a gradient far from every palette colour
    rows = np.linspace(0, 1, 64)[:, None, None]
    photo = (rows * np.array([200, 170, 120]) + (1 - rows) * np.array([90, 110, 160])).astype(
        np.uint8
    )
    Image.fromarray(np.broadcast_to(photo, (64, 96, 3)).copy()).save(tmp_path / "photo.png")
    with pytest.raises(LayoutError, match="does not look like a layout"):
        load_label_map(tmp_path / "photo.png", palette)
