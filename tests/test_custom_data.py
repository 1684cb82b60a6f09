"""A user's own folder of photos (and label maps) all the way to a bundle the app loads.

The commands are those of docs/training.md, run in-process through `train.main` from a scratch
folder with the tiny configs and only a few steps each, so the whole path takes seconds.
"""

from __future__ import annotations

import io
import logging
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

import train
from core.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = REPO_ROOT / "configs" / "tiny"
SKY, GRASS, MOUNTAIN, WATER = 1, 3, 5, 7  # palette ids


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """Training installs SIGTERM / SIGINT handlers; give pytest its own back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def landscape(width: int, height: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """A photo (sky gradient, mountain, grass, a lake) and its label map of palette ids."""
    horizon = int(height * rng.uniform(0.4, 0.6))
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (70, 130, 220) + rows * (130, 90, 30)
    grass = (90, 160, 50) - rows * (50, 70, 30)
    pixels = np.where(np.arange(height)[:, None, None] < horizon, sky, grass)
    photo = Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8))
    ids = np.where(np.arange(height)[:, None] < horizon, SKY, GRASS)
    label = Image.fromarray(np.broadcast_to(ids, (height, width)).astype(np.uint8), mode="L")
    peak = int(rng.integers(15, width - 15))
    mountain = [(peak - 30, horizon), (peak, horizon - height // 3), (peak + 30, horizon)]
    lake = (width // 4, horizon + 6, width // 2, horizon + 14)
    for image, mountain_fill, lake_fill in ((photo, (125, 95, 75), (40, 110, 200)),
                                            (label, MOUNTAIN, WATER)):  # fmt: skip
        ImageDraw.Draw(image).polygon(mountain, fill=mountain_fill)
        ImageDraw.Draw(image).ellipse(lake, fill=lake_fill)
    return photo, label


def write_good_photos(photos: Path, labels: Path, count: int) -> list[str]:
    photos.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    names = []
    for index in range(count):
        photo, label = landscape(int(rng.integers(72, 97)), int(rng.integers(64, 81)), rng)
        photo.save(photos / f"lake_{index:02d}.jpg", quality=92)
        label.save(labels / f"lake_{index:02d}.png")
        names.append(f"lake_{index:02d}.jpg")
    return names


def write_bad_files(photos: Path) -> None:
    """Three files a real photo folder collects: cut short, not an image, and a 1×1 pixel."""
    buffer = io.BytesIO()
    landscape(90, 70, np.random.default_rng(9))[0].save(buffer, format="JPEG")
    (photos / "a_cut_short.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (photos / "b_notes.jpg").write_text("remember to buy film\n")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(photos / "c_pixel.png")


def train_cli(*argv: str) -> None:
    assert train.main(list(argv)) == 0


def test_bad_files_are_skipped_with_warnings_naming_them(workdir, caplog):
    write_good_photos(workdir / "photos", workdir / "labels", 5)
    write_bad_files(workdir / "photos")

    with caplog.at_level(logging.WARNING):
        train_cli(
            "vqgan", "--config", str(TINY / "vqgan.yaml"), "data.folder=photos",
            "run.steps=3", "run.batch_size=2",
        )  # fmt: skip

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("a_cut_short.jpg: not a readable image" in w for w in warnings)
    assert any("b_notes.jpg: not a readable image" in w for w in warnings)
    assert any("c_pixel.png: 1x1 is smaller than the 64 px crop" in w for w in warnings)
    assert "using 5 of 8 photos" in warnings
    checkpoint = load_checkpoint(workdir / "runs" / "tiny_vqgan" / "checkpoint")
    assert checkpoint.extra["step"] == 3
    assert (
        "data: 5 photos" in (workdir / "runs" / "tiny_vqgan" / "checkpoint" / "card.md").read_text()
    )


@pytest.mark.slow
def test_a_folder_of_photos_and_label_maps_becomes_a_bundle_the_app_loads(workdir):
    from core.pipeline import GenerateRequest, Pipeline, Result

    write_good_photos(workdir / "my_photos", workdir / "my_labels", 8)
    write_bad_files(workdir / "my_photos")  # the first files in order: none may be the val split
    data = ["data.folder=my_photos", "data.labels=my_labels"]

    train_cli("vqgan", "--config", str(TINY / "vqgan.yaml"), *data, "run.steps=8")
    train_cli("condition", "--config", str(TINY / "layout.yaml"), *data, "run.steps=8")
    train_cli("transformer", "--config", str(TINY / "transformer.yaml"), *data, "run.steps=8")
    train_cli("bundle", "transformer=runs/tiny_transformer/checkpoint", "out=my_bundle")

    manifest = yaml.safe_load((workdir / "my_bundle" / "bundle.yaml").read_text())
    assert sorted(manifest["models"]) == ["image", "layout", "transformer"]
    transformer = load_checkpoint(workdir / "my_bundle" / "transformer", kind="transformer")
    assert transformer.model["image_vocab"] == 64  # the tiny VQGAN's codebook, not the default
    assert transformer.model["cond_vocab"] == 32 + 8  # layout codes + task and scene prefixes
    pipeline = Pipeline.load(workdir / "my_bundle")
    assert pipeline.modes == ["layout", "free"]
    layout = np.full((48, 80), SKY)
    layout[20:] = GRASS
    layout[30:40, 10:40] = WATER
    request = GenerateRequest("layout", width=80, height=48, condition=layout, seed=1)

    events = list(pipeline.generate(request))

    result = events[-1]
    assert isinstance(result, Result)
    assert result.images[0].shape == (48, 80, 3)
    assert result.images[0].dtype == np.uint8
    assert result.tokens.shape == (1, 6, 10)  # f = 8
    assert not result.stopped
