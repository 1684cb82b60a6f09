"""Composing: a tall picture is sampled at photo scale, then enlarged with superres."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from core.conditions import resize_edges
from core.pipeline import GenerateRequest, InputError, Pipeline, Preview, Result
from core.sampler import grid_for_pixels


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.tiny()


def layout(width: int, height: int) -> np.ndarray:
    ids = np.full((height, width), 1, dtype=np.int64)  # sky
    ids[height // 2 :] = 7  # water
    return ids


@pytest.mark.parametrize(
    ("width", "height", "plan"),
    [
        (1280, 832, (320, 208, 4)),  # 832 / 4 = 208 px: already in 192–320
        (1024, 1024, (256, 256, 4)),
        (1024, 704, (272, 192, 4)),  # 704 / 4 = 176 is too low: 192; width 1024 × 192 / 704
        (2048, 2048, (256, 256, 8)),  # ×4 would compose 512 px high: ×8 instead
        (512, 512, None),  # at most 640 px high: sampled directly
        (1280, 640, None),
    ],
)
def test_compose_plan_keeps_the_small_picture_192_to_320_px_high(pipeline, width, height, plan):
    request = GenerateRequest("layout", width=width, height=height, compose=True)
    assert pipeline.compose_plan(request) == plan


@pytest.mark.parametrize(
    ("width", "height", "plan"),
    [
        (512, 512, (192, 192, 4)),  # free mode has no painting to hold 512 px together
        (1024, 576, (336, 192, 4)),  # 576 / 4 = 144 is too low: 192; 1024 × 192 / 576 = 341
        (256, 256, None),  # about the training photos' scale: sampled directly
    ],
)
def test_free_mode_composes_from_lower_heights(pipeline, width, height, plan):
    request = GenerateRequest("free", width=width, height=height, compose=True)
    assert pipeline.compose_plan(request) == plan


def test_compose_plan_leaves_superres_alone(pipeline):
    assert pipeline.compose_plan(GenerateRequest("superres", width=1024, height=1024)) is None


def test_a_composed_picture_streams_both_passes_at_the_requested_size(pipeline):
    width, height = 256, 704  # composed 64 × 192, enlarged ×4 to 256 × 768, scaled to the size
    request = GenerateRequest("layout", width, height, layout(width, height), seed=3, compose=True)

    events = list(pipeline.generate(request))

    previews, result = events[:-1], events[-1]
    assert isinstance(result, Result) and all(isinstance(e, Preview) for e in previews)
    assert {p.images[0].shape for p in previews} == {(height, width, 3)}
    assert previews[-1].rows_total == 192 // 16 + 768 // 16
    assert previews[-1].tokens_total == 12 * 4 + 48 * 16
    assert [p.rows_done for p in previews] == sorted(p.rows_done for p in previews)
    stages = [p.stage for p in previews]
    assert stages[0] == "composing 64×192" and stages[-2] == "enlarging ×4"
    assert stages[-1].startswith("finishing") and previews[-1].rows_done == previews[-1].rows_total
    assert np.array_equal(previews[-1].images[0], result.images[0])  # shown before the tokens
    assert result.extra["composed"][0].shape == (192, 64, 3)
    assert result.images[0].shape == (height, width, 3)
    assert result.tokens.shape == (1, height // 16, width // 16)  # the final image's own tokens
    assert result.settings["compose"] is True
    assert {frame.shape for frame in result.frames} == {(height, width, 3)}
    # superres is back-projected onto the composed picture, so shrunk back they nearly agree
    shrunk = np.asarray(Image.fromarray(result.images[0]).resize((64, 192), Image.LANCZOS))
    difference = np.abs(shrunk.astype(int) - result.extra["composed"][0].astype(int)).mean()
    assert difference < 8


def test_without_compose_the_size_is_sampled_directly(pipeline):
    request = GenerateRequest("layout", 256, 704, layout(256, 704), seed=3)

    result = list(pipeline.generate(request))[-1]

    assert "composed" not in result.extra
    assert result.settings["compose"] is False


def test_a_too_large_composed_request_is_refused_before_sampling(pipeline):
    request = GenerateRequest("layout", 4096, 512, layout(64, 64), compose=True)
    with pytest.raises(InputError, match="width must be between"):
        pipeline.generate(request)


def test_shrinking_a_sketch_keeps_its_one_pixel_lines():
    edges = np.zeros((64, 64), dtype=np.uint8)
    edges[:, 5] = 255  # a nearest-neighbour shrink ×4 samples columns 0, 4, 8, …: lost

    small = resize_edges(edges, 16, 16)

    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 255}
    assert (small[:, 1] == 255).sum() >= 14  # the line, thinned (its ends may shorten)
    assert (small[:, [0, 2, 3]] == 0).all()


def test_a_painted_lake_layout_stacks_sky_mountain_water_grass():
    from core.palette import Palette
    from core.report import painted_layout

    palette = Palette.default()
    ids = painted_layout(200, 100, np.random.default_rng(0), palette)

    names = [palette.names[i] for i in (1, 2, 3, 5, 7)]
    assert names == ["sky", "tree", "grass", "mountain", "water"]
    assert ids.shape == (100, 200)
    assert set(np.unique(ids)) == {1, 3, 5, 7}
    for column in ids.T:  # top to bottom: sky, mountain, water, grass, each in one run
        order = [int(v) for i, v in enumerate(column) if i == 0 or v != column[i - 1]]
        assert order == [1, 5, 7, 3]


def test_stopping_while_enlarging_keeps_a_picture_of_the_requested_size(pipeline):
    import threading

    stop = threading.Event()
    request = GenerateRequest("layout", 256, 704, layout(256, 704), seed=3, compose=True)

    events = []
    for event in pipeline.generate(request, stop=stop):
        events.append(event)
        if isinstance(event, Preview) and event.stage.startswith("enlarging"):
            stop.set()

    result = events[-1]
    assert isinstance(result, Result) and result.stopped
    assert result.images[0].shape == (704, 256, 3)
    assert result.tokens.shape == (1, 44, 16)
    assert any(e.stage.startswith("composing") for e in events[:-1])


def test_a_flat_depth_map_is_refused(pipeline):
    flat = np.full((64, 64), 0.5, dtype=np.float32)
    with pytest.raises(InputError, match="one flat value"):
        list(pipeline.generate(GenerateRequest("depth", 64, 64, flat)))


def test_a_scene_is_guided_from_any_scene(pipeline):
    grid = grid_for_pixels(64, 64, pipeline.factor)
    request = GenerateRequest("free", width=64, height=64, scene="lake", num_samples=2)
    condition = pipeline.condition_tokens(request, None, grid)
    lake = pipeline.vocabulary.prefix_for("free", "lake")
    assert condition.prefix.tolist() == [[lake], [lake]]
    assert condition.unguided_prefix.tolist() == [[pipeline.any_scene]] * 2
    assert pipeline.any_scene != lake
    for plain in (replace(request, guidance=1.0), replace(request, scene=None)):
        assert pipeline.condition_tokens(plain, None, grid).unguided_prefix is None


def test_a_guided_scene_is_generated(pipeline):
    request = GenerateRequest("free", width=64, height=48, scene="forest", guidance=3.0)
    result = next(e for e in pipeline.generate(request) if isinstance(e, Result))
    assert result.images[0].shape == (48, 64, 3)
