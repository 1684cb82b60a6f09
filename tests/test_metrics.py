"""The report's measures: mIoU, the Fréchet distance, the layout segmenter, the report itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.fid import Lite0Features, frechet_distance
from core.palette import FREE_ID, Palette
from core.segmenter import (
    DEFAULT_MODELS,
    DEFAULT_PALETTE_SOURCES,
    MODEL_FILE,
    Segmenter,
    SegmenterError,
    miou,
)

SHARED_PRESENT = (DEFAULT_MODELS / MODEL_FILE).is_file() and DEFAULT_PALETTE_SOURCES.is_file()
needs_segmenter = pytest.mark.skipif(
    not SHARED_PRESENT, reason="the data pack's segmenter (../shared/models) is not here"
)


# ----------------------------------------------------------------------------- mIoU


def test_miou_scores_only_classes_present_and_skips_unknown_target_pixels():
    target = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3]])
    predicted = np.array([[1, 1, 1, 2], [1, 1, 2, 2], [2, 2, 3, 0]])
    score = miou(predicted, target, num_classes=13)
    # class 1: 4 / 5; class 2: 3 / 4 (the 2s under unknown target pixels do not count);
    # class 3: 1 / 2 (a prediction of unknown is a miss)
    assert score.per_class == pytest.approx({1: 0.8, 2: 0.75, 3: 0.5})
    assert score.miou == pytest.approx((0.8 + 0.75 + 0.5) / 3)
    assert score.pixel_accuracy == pytest.approx(8 / 10)
    assert score.pixels == 10


def test_miou_counts_a_class_only_predicted_as_zero():
    target = np.array([[1, 1], [1, 1]])
    predicted = np.array([[1, 1], [1, 4]])
    score = miou(predicted, target, num_classes=13)
    assert score.per_class == pytest.approx({1: 0.75, 4: 0.0})
    assert score.miou == pytest.approx(0.375)


def test_miou_ignores_free_target_pixels():
    target = np.array([[1, FREE_ID], [FREE_ID, FREE_ID]])
    predicted = np.array([[1, 5], [5, 5]])
    score = miou(predicted, target, num_classes=13)
    assert score.miou == 1.0
    assert score.pixels == 1


def test_miou_of_a_target_without_scored_pixels_is_nan():
    score = miou(np.ones((2, 2)), np.zeros((2, 2)), num_classes=13)
    assert np.isnan(score.miou) and np.isnan(score.pixel_accuracy)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_one_dimensional_sets():
    # means 1 and 12, variances 2 and 8: 11² + (√2 − √8)² = 121 + 2
    assert frechet_distance([[0.0], [2.0]], [[10.0], [14.0]]) == pytest.approx(123.0)


def test_frechet_distance_with_rank_deficient_covariances():
    # two points in 2-D: Σ₁ = diag(2, 0), Σ₂ = diag(0, 8), Σ₁Σ₂ = 0; |μ₁ − μ₂|² = 1 + 4
    first = [[0.0, 0.0], [2.0, 0.0]]
    second = [[0.0, 0.0], [0.0, 4.0]]
    assert frechet_distance(first, second) == pytest.approx(15.0)


def test_frechet_distance_of_a_feature_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(12, 1280))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


@pytest.fixture(scope="module")
def lite0() -> Lite0Features:
    return Lite0Features()


def _noisy_images(colour: tuple[int, int, int], count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float64)
    return [
        np.clip(base + rng.normal(0, 20, (96, 128, 3)), 0, 255).astype(np.uint8)
        for _ in range(count)
    ]


def test_lite0_features_are_1280_per_image(lite0):
    assert lite0.features(_noisy_images((90, 160, 220), 3, seed=0)).shape == (3, 1280)


def test_frechet_distance_of_images_with_themselves_is_zero_and_of_others_positive(lite0):
    skies = lite0.features(_noisy_images((110, 170, 230), 6, seed=1))
    bricks = lite0.features(_noisy_images((150, 40, 30), 6, seed=2))
    assert frechet_distance(skies, skies) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(skies, bricks) > 1.0


# ----------------------------------------------------------------------------- segmenter


def test_segmenter_without_its_files_says_where_to_put_them(tmp_path):
    with pytest.raises(SegmenterError, match="shared/models"):
        Segmenter(models=tmp_path)


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter()


@needs_segmenter
def test_segmenter_maps_ade20k_classes_to_the_palette_by_name(segmenter):
    palette = Palette.default()
    expected = {"sky": "sky", "sea": "water", "hill": "mountain", "person": "object"}
    for ade20k_name, palette_name in expected.items():
        ade20k_id = segmenter.ade20k_names.index(ade20k_name)
        assert segmenter.lookup[ade20k_id] == palette.id_of(palette_name)
    assert segmenter.lookup[segmenter.ade20k_names.index("floor")] == 0  # not a landscape class


@needs_segmenter
def test_segmenter_sees_sky_above_grass(segmenter):
    # Flat, textureless green reads as more sky to this network; light noise makes it grass.
    rng = np.random.default_rng(0)
    image = np.zeros((192, 288, 3), dtype=np.float64)
    image[:96] = (135, 206, 235)
    image[96:] = (90, 160, 50) + rng.normal(0, 8, (96, 288, 3))
    ids = segmenter(np.clip(image, 0, 255).astype(np.uint8))
    palette = Palette.default()
    assert ids.shape == (192, 288)
    assert (ids[:96] == palette.id_of("sky")).mean() > 0.9
    assert (ids[96:] == palette.id_of("grass")).mean() > 0.9


# ----------------------------------------------------------------------------- the report


def test_layout_figures_give_iou_per_painted_class():
    from core.report import _layout_figures, _layout_lines

    # rows: layout class (unknown, sky, grass, water), columns: predicted, last = outside
    generated = np.array([[0, 0, 0, 0, 0], [0, 8, 2, 0, 0], [0, 5, 5, 0, 0], [0, 0, 0, 0, 0]])
    real = np.array([[0, 0, 0, 0, 0], [0, 10, 0, 0, 0], [0, 0, 9, 0, 1], [0, 0, 0, 0, 0]])
    names = ("unknown", "sky", "grass", "water")

    figures = _layout_figures(generated, real, [0.5], [0.9], names)

    assert set(figures["classes"]) == {"sky", "grass"}  # water is not painted
    assert figures["classes"]["sky"]["pixels"] == 10
    assert figures["classes"]["sky"]["iou_generated"] == pytest.approx(8 / 15)
    assert figures["classes"]["grass"]["iou_generated"] == pytest.approx(5 / 12)
    assert figures["classes"]["grass"]["iou_real"] == pytest.approx(9 / 10)
    text = "\n".join(_layout_lines({"human": figures}))
    assert "| sky | 0.53 / 1.00 (50%) |" in text
    assert "| grass | 0.42 / 0.90 (50%) |" in text


@needs_segmenter
@pytest.mark.slow
def test_report_runs_end_to_end_with_the_tiny_pipeline(tmp_path, capsys):
    from core.report import main

    markdown = tmp_path / "REPORT.md"
    argv = ["--tiny", "--limit", "2", "--superres-limit", "1", "--bsds-limit", "1"]
    assert main([*argv, "--painted-limit", "1", "--out", str(markdown)]) == 0

    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "REPORT.json").read_text())
    assert printed == saved
    assert saved["layout"]["human"]["photos"] == 2
    assert saved["layout"]["pseudo"]["photos"] == 2
    assert 0.0 < saved["layout"]["human"]["miou_real"] <= 1.0
    assert saved["superres"]["x4"]["photos"] == 1
    assert saved["frechet"]["images_per_set"] == 2
    assert saved["frechet"]["free_vs_real"] > 0
    assert saved["painted"]["layouts"] == 1
    assert set(saved["painted"]["512x512"]) == {"direct"}  # 512 px high: never composed
    assert set(saved["painted"]["1280x832"]) == {"direct", "composed"}
    assert 0.0 <= saved["painted"]["1280x832"]["composed"]["pixel_accuracy"] <= 1.0
    text = markdown.read_text()
    assert "Fréchet distance on EfficientNet-Lite0 features" in text
    assert "perceptual distance (SqueezeNet)" in text
    assert "(report_examples.png)" in text
    assert "## Painted layouts" in text
    assert "IoU per painted class" in text
    for entry in saved["layout"]["human"]["classes"].values():
        assert entry["pixels"] > 0 and 0.0 <= entry["iou_real"] <= 1.0
    assert (tmp_path / "report_examples.png").is_file()
