"""The studio: canvases to conditions, settings inside PNGs, and the app driven by gradio_client.

The app tests start `python app.py --tiny` on a free port once for the module and talk to it
as any API user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw, PngImagePlugin

from core.metadata import KEYWORD, MetadataError, read_metadata, save_png
from core.models import Vocabulary
from core.palette import FREE_ID, Palette
from core.pipeline import Pipeline
from core.transformer import GPT, GPTConfig
from studio import canvas
from studio.app import Studio, build_app
from studio.runs import StopSwitches, in_own_thread, write_timelapse

REPO_ROOT = Path(__file__).resolve().parent.parent
SKY, TREE, WATER = (135, 206, 235), (34, 139, 34), (30, 144, 255)


def painted_canvas(size: int = 64, supersample: int = 4) -> np.ndarray:
    """An ImageEditor-like RGBA composite: transparent paper, soft-edged strokes of 3 classes."""
    big = Image.new("RGBA", (size * supersample, size * supersample), (0, 0, 0, 0))
    draw = ImageDraw.Draw(big)
    s = supersample
    draw.rectangle([0, 0, size * s, 20 * s], fill=(*SKY, 255))
    draw.ellipse([8 * s, 14 * s, 30 * s, 40 * s], fill=(*TREE, 255))
    draw.line([(0, 50 * s), (size * s, 46 * s)], fill=(*WATER, 255), width=6 * s)
    # Downsampling blends neighbouring strokes and the transparent paper, as a browser's
    # anti-aliased brush does.
    return np.asarray(big.resize((size, size), Image.Resampling.LANCZOS))


def editor_value(composite: np.ndarray) -> dict:
    return {"background": None, "layers": [composite], "composite": composite}


# --- canvases ------------------------------------------------------------------------------


def test_anti_aliased_canvas_becomes_only_palette_ids_and_free():
    composite = painted_canvas()
    palette_colours = {*Palette.default().colours}
    opaque = composite[composite[..., 3] == 255][:, :3]
    blended = {tuple(int(c) for c in pixel) for pixel in opaque} - palette_colours
    assert blended, "the test canvas should hold blended edge colours"
    assert ((composite[..., 3] > 0) & (composite[..., 3] < 255)).any()

    ids = canvas.layout_from_canvas(editor_value(composite), Palette.default())

    assert ids.shape == (64, 64)
    assert set(np.unique(ids)) <= {1, 2, 7, FREE_ID}  # sky, tree, water, free
    assert ids[5, 40] == 1  # inside the sky band
    assert ids[27, 19] == 2  # inside the tree
    assert ids[48, 32] == 7  # on the water line
    assert ids[60, 60] == FREE_ID  # unpainted paper


def test_a_new_canvas_size_scales_what_was_painted():
    palette = Palette.default()
    layout = np.zeros((64, 64, 4), dtype=np.uint8)  # sky above, water below row 40, no free
    layout[:40] = (*SKY, 255)
    layout[40:] = (*WATER, 255)
    sketch = np.full((64, 64, 3), 255, dtype=np.uint8)
    sketch[:, 31:33] = 0  # a vertical stroke in the middle
    depth = np.zeros((64, 64, 3), dtype=np.uint8)
    depth[32:] = 200  # the lower half is near

    scaled_layout, scaled_sketch, scaled_depth = canvas.scaled_canvases(
        editor_value(layout), editor_value(sketch), editor_value(depth), 160, 96, palette
    )

    ids = canvas.layout_from_canvas(scaled_layout, palette)
    assert ids.shape == (96, 160)
    assert (ids[:60] == 1).all() and (ids[60:] == 7).all()  # row 40 of 64 is row 60 of 96
    lines = canvas.sketch_from_canvas(scaled_sketch).mean(axis=2) < 128
    assert lines.shape == (96, 160)
    assert set(np.flatnonzero(lines.any(axis=0))) <= set(range(76, 84)) and lines[:, 80].all()
    near = canvas.depth_from_canvas(scaled_depth)
    assert near.shape == (96, 160)
    assert np.allclose(near[:47], 0.0) and np.allclose(near[49:], 200 / 255, atol=1e-3)


def test_a_new_size_for_empty_canvases_gives_blank_ones():
    palette = Palette.default()
    empty = editor_value(np.zeros((32, 32, 4), dtype=np.uint8))
    layout, sketch, depth = canvas.scaled_canvases(empty, None, None, 48, 16, palette)
    assert (canvas.edited_layout(layout, palette) == FREE_ID).all()
    assert layout["composite"].shape == (16, 48, 4)
    assert (sketch["composite"] == 255).all() and sketch["composite"].shape == (16, 48, 3)
    assert (depth["composite"] == 0).all() and depth["composite"].shape == (16, 48, 3)


def test_empty_canvas_asks_the_user_to_paint():
    empty = np.zeros((32, 32, 4), dtype=np.uint8)
    with pytest.raises(canvas.CanvasError, match="canvas is empty"):
        canvas.layout_from_canvas(editor_value(empty), Palette.default())


def test_layout_of_only_unknown_is_refused():
    unknown = np.zeros((32, 32, 4), dtype=np.uint8)
    unknown[..., 3] = 255  # opaque black = the "unknown" class
    with pytest.raises(ValueError, match="no known class"):
        canvas.layout_from_canvas(editor_value(unknown), Palette.default())


def test_size_over_the_limit_names_the_limit():
    with pytest.raises(canvas.CanvasError, match="between 16 and 2048"):
        canvas.check_size(4096, 512, max_side=2048)
    assert canvas.check_size(1280.0, 832.0, max_side=2048) == (1280, 832)


def test_layout_canvas_shows_free_as_transparent():
    ids = np.array([[1, FREE_ID], [2, 2]])
    value = canvas.layout_canvas(ids, Palette.default())
    assert value["background"][0, 1, 3] == 0
    assert tuple(value["background"][0, 0]) == (*SKY, 255)


def test_non_image_upload_is_refused(tmp_path: Path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(canvas.CanvasError, match="not an image"):
        canvas.read_layout_upload(text, Palette.default())


def test_an_uploaded_drawing_sets_the_size_and_its_transparent_paper_is_white(tmp_path: Path):
    drawing = np.zeros((40, 64, 4), dtype=np.uint8)  # transparent paper
    drawing[20, :] = (0, 0, 0, 255)  # one black line
    Image.fromarray(drawing).save(tmp_path / "line.png")
    sketch, width, height, status = Studio(Pipeline.tiny(), tmp_path).load_sketch(
        str(tmp_path / "line.png")
    )
    assert (width, height) == (64, 40) and "64 × 40 drawing from line.png" in status
    grey = canvas.sketch_from_canvas(sketch)
    assert (grey[20] == 0).all() and (np.delete(grey, 20, axis=0) == 255).all()

    (tmp_path / "notes.png").write_text("no picture")
    with pytest.warns(UserWarning, match="notes.png"):  # gr.Warning, outside an app
        *kept, status = Studio(Pipeline.tiny(), tmp_path).load_sketch(str(tmp_path / "notes.png"))
    assert "notes.png is not an image" in status
    assert all(output == gr.skip() for output in kept)  # the canvas and the sizes keep theirs


def test_an_upload_that_is_no_image_is_named_as_it_arrives(tmp_path: Path):
    fake = tmp_path / "f3a9.png"  # Gradio keeps uploads under its own names
    fake.write_text("not an image")
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)

    message = canvas.unreadable_upload({"path": str(fake), "orig_name": "holiday.png"}, "a photo")
    assert message == (
        "holiday.png is not an image I can read; a photo must be a PNG (or another image file)."
    )
    assert "f3a9.png is not an image" in canvas.unreadable_upload({"path": str(fake)}, "a photo")
    assert canvas.unreadable_upload({"path": str(good)}, "a photo") is None
    assert canvas.unreadable_upload(None, "a photo") is None


def test_mask_is_what_was_painted_over_the_result():
    layer = np.zeros((32, 48, 4), dtype=np.uint8)
    layer[4:10, 6:20] = (255, 48, 64, 150)
    mask = canvas.mask_from_canvas({"background": None, "layers": [layer]}, (32, 48))
    assert mask.sum() == 6 * 14
    assert mask[5, 10] and not mask[20, 30]


# --- settings in PNGs ----------------------------------------------------------------------


def test_settings_survive_a_png_round_trip(tmp_path: Path):
    settings = {
        "mode": "layout",
        "width": 1024,
        "height": 576,
        "scene": None,
        "superres_factor": 4,
        "seed": 1234,
        "temperature": 0.9,
        "top_k": 100,
        "top_p": None,
        "guidance": 2.5,
        "window": None,
        "num_samples": 2,
    }
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    path = save_png(image, tmp_path / "result.png", settings, "landscape-v1", sample=1)

    document = read_metadata(path)

    assert document["request"] == settings
    assert document["model"] == "landscape-v1"
    assert document["sample"] == 1
    assert Image.open(path).info  # a plain tEXt chunk other tools can read


def test_png_without_settings_is_refused(tmp_path: Path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(MetadataError, match="carries no studio settings"):
        read_metadata(path)


def test_timelapse_has_a_frame_per_row_and_holds_the_final(tmp_path: Path):
    frames = [np.full((32, 48, 3), value, dtype=np.uint8) for value in (0, 80, 160)]
    final = np.full((32, 48, 3), 255, dtype=np.uint8)
    gif = Image.open(write_timelapse(frames, final, tmp_path / "t.gif"))
    assert gif.n_frames == 4
    assert gif.size == (48, 32)


# --- stopping ------------------------------------------------------------------------------


def test_a_stop_reaches_only_the_sessions_current_run():
    switches = StopSwitches()
    first = switches.start("alice")
    other = switches.start("bob")
    second = switches.start("alice")  # a new run: the earlier event is no longer the one
    assert switches.stop("alice")
    assert second.is_set() and not first.is_set() and not other.is_set()
    switches.finish("alice", second)
    assert not switches.stop("alice")  # nothing running any more


def test_sampling_thread_stops_when_the_page_leaves():
    stop = threading.Event()

    def endless():
        while not stop.is_set():
            time.sleep(0.01)
            yield 1

    stream = in_own_thread(endless, stop)
    next(stream)
    stream.close()
    assert stop.is_set()


# --- the command line ----------------------------------------------------------------------


def run_app(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "app.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_answers_without_loading_models():
    started = time.monotonic()
    done = run_app("--help", timeout=30)
    assert done.returncode == 0
    assert "--tiny" in done.stdout and "--checkpoints" in done.stdout
    assert time.monotonic() - started < 10


def test_missing_checkpoints_give_one_line_and_exit_code_2(tmp_path: Path):
    done = run_app("--checkpoints", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "bundle.yaml" in lines[0] and "Traceback" not in done.stderr


# --- the app through gradio_client ---------------------------------------------------------


@pytest.fixture
def client(studio_url: str):
    from gradio_client import Client

    return Client(studio_url, verbose=False)


def layout_file(tmp_path: Path, size: int) -> Path:
    """A palette-coloured layout: sky above, trees below, the middle left free."""
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[: size // 2] = (*SKY, 255)
    rgba[size * 3 // 4 :] = (*TREE, 255)
    path = tmp_path / "layout.png"
    Image.fromarray(rgba).save(path)
    return path


def generate_args(
    canvas_path: Path | None, size: int, seed: int = 7, compose: bool = False
) -> list:
    from gradio_client import handle_file

    layout = None
    if canvas_path is not None:
        layout = {
            "background": handle_file(str(canvas_path)),
            "layers": [],
            "composite": handle_file(str(canvas_path)),
        }
    # mode, layout, sketch, depth, photo, superres_factor, scene, width, height,
    # seed, temperature, top_k, top_p, window, guidance, num_samples, compose, prior
    return [
        "layout", layout, None, None, None, 4, "any", size, size, seed, 1.0, 100, 1.0, 0, 1.5, 1,
        compose, 2.5,
    ]  # fmt: skip


def test_generate_streams_previews_and_the_png_restores_its_settings(client, tmp_path: Path):
    from gradio_client import handle_file

    job = client.submit(*generate_args(layout_file(tmp_path, 128), 128), api_name="/generate")
    preview, status, gallery, downloads, _ = job.result(timeout=180)

    # outputs: preview, status, gallery, downloads, mask canvas (session state is not sent)
    streamed = [out for out in job.outputs() if isinstance(out[0], str) and "row" in out[1]]
    assert len(streamed) >= 2
    assert "done" in status
    result_png, condition_png = downloads
    assert Image.open(result_png).size == (128, 128)
    assert Image.open(condition_png).mode == "P"  # the layout as palette ids

    document = read_metadata(result_png)
    assert document["request"]["seed"] == 7
    assert document["model"] == "tiny-untrained"

    restored = client.predict(handle_file(result_png), api_name="/restore")
    # mode, width, height, scene, superres_factor, seed, temperature, top_k, top_p, window,
    # guidance, num_samples, compose, prior (the tiny model has none: the PNG says off), status
    expected = ("layout", 128, 128, "any", 4, 7, 1.0, 100, 1.0, 0, 1.5, 1, False, 0.0)
    assert restored[:14] == expected


def test_empty_canvas_gives_the_user_a_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="canvas is empty"):
        client.predict(*generate_args(None, 128), api_name="/generate")


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (7, -100, "-100 × 128 is outside the limit"),  # width
        (9, -5, "The seed must be a whole number from 0"),
    ],
)
def test_a_bad_number_gets_a_message_naming_its_field(client, tmp_path, index, value, message):
    from gradio_client.exceptions import AppError

    args = generate_args(layout_file(tmp_path, 128), 128)
    args[index] = value
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/generate")


def test_a_flat_depth_canvas_is_refused(client, tmp_path: Path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    black = tmp_path / "black.png"  # the depth tab's untouched canvas
    Image.fromarray(np.zeros((128, 128, 3), dtype=np.uint8)).save(black)
    args = generate_args(None, 128)
    args[0] = "depth"
    args[3] = {
        "background": handle_file(str(black)),
        "layers": [],
        "composite": handle_file(str(black)),
    }
    with pytest.raises(AppError, match="one flat shade"):
        client.predict(*args, api_name="/generate")


def refused_restore(client, path: Path) -> str:
    """The status of a restore the studio refuses, checking that no control was changed."""
    from gradio_client import handle_file

    *controls, status = client.predict(handle_file(str(path)), api_name="/restore")
    assert all(value == {"__type__": "update"} for value in controls), controls  # skipped
    return status


def test_restore_refuses_a_png_without_settings(client, tmp_path: Path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert "carries no studio settings" in refused_restore(client, plain)


def test_stop_ends_a_run_early_and_keeps_its_rows(client, tmp_path: Path):
    job = client.submit(*generate_args(layout_file(tmp_path, 64), 1024), api_name="/generate")
    deadline = time.monotonic() + 120
    while sum("row" in str(out[1]) for out in job.outputs()) < 2:
        assert time.monotonic() < deadline and not job.done(), "no previews arrived"
        time.sleep(0.1)

    stopped_at = time.monotonic()
    assert "Stopping" in client.predict(api_name="/stop")
    _, status, _, downloads, _ = job.result(timeout=60)

    assert "stopped early" in status
    assert time.monotonic() - stopped_at < 15  # the sampler halts at once; decoding takes a bit
    assert read_metadata(downloads[0])["stopped"] is True


def test_resample_extend_and_timelapse_work_on_the_latest_result(client, tmp_path: Path):
    from gradio_client import handle_file

    client.predict(*generate_args(layout_file(tmp_path, 64), 64, seed=3), api_name="/generate")
    mask = np.zeros((64, 64, 4), dtype=np.uint8)
    mask[8:24, 8:40] = (255, 48, 64, 150)  # painted over the result
    Image.fromarray(mask).save(tmp_path / "mask.png")
    blank = handle_file(str(layout_file(tmp_path, 64)))
    mask_canvas = {"background": blank, "layers": [handle_file(str(tmp_path / "mask.png"))]}
    mask_canvas["composite"] = blank

    # mask canvas, seed, temperature, top_k, top_p, window, guidance, prior
    resampled = client.predict(mask_canvas, 5, 1.0, 100, 1.0, 0, 2.0, 2.0, api_name="/resample")
    assert "done" in resampled[1]
    assert read_metadata(resampled[3][0])["kind"] == "resample"

    # right, down, seed, temperature, top_k, top_p, window, guidance, prior
    extended = client.predict(32, 16, 5, 1.0, 100, 1.0, 0, 2.0, 2.0, api_name="/extend")
    assert Image.open(extended[3][0]).size == (96, 80)
    recorded = read_metadata(extended[3][0])["request"]  # restores the grown size
    assert (recorded["width"], recorded["height"]) == (96, 80)

    # the grown result is the latest: a mask at its own size redoes part of it
    Image.new("RGB", (96, 80), "white").save(tmp_path / "grown.png")
    grown = handle_file(str(tmp_path / "grown.png"))
    mask = np.zeros((80, 96, 4), dtype=np.uint8)
    mask[60:, 70:] = (255, 48, 64, 150)
    Image.fromarray(mask).save(tmp_path / "grown-mask.png")
    canvas = {"background": grown, "layers": [handle_file(str(tmp_path / "grown-mask.png"))]}
    canvas["composite"] = grown
    again = client.predict(canvas, 6, 1.0, 100, 1.0, 0, 2.0, 2.0, api_name="/resample")
    assert "done" in again[1] and Image.open(again[3][0]).size == (96, 80)

    gif = Image.open(client.predict(api_name="/timelapse"))
    assert gif.format == "GIF" and gif.n_frames >= 2


def test_restore_names_a_setting_with_an_unusable_value(client, tmp_path: Path):

    path = save_png(
        np.zeros((16, 16, 3), np.uint8),
        tmp_path / "odd.png",
        {"mode": "layout", "width": 512, "height": 512, "seed": "abc"},
        "tiny",
    )
    assert "'seed' holds 'abc'" in refused_restore(client, path)


def test_restore_refuses_a_guidance_outside_the_studios_range(client, tmp_path: Path):

    path = save_png(
        np.zeros((16, 16, 3), np.uint8),
        tmp_path / "strong.png",
        {"mode": "layout", "width": 512, "height": 512, "seed": 1, "guidance": 9.0},
        "tiny",
    )
    assert "guidance 9 is outside 0–8" in refused_restore(client, path)


def test_a_png_from_before_the_class_prior_restores_it_off(client, tmp_path: Path):
    from gradio_client import handle_file

    settings = {"mode": "layout", "width": 512, "height": 512, "seed": 1, "guidance": 3.0}
    path = save_png(np.zeros((16, 16, 3), np.uint8), tmp_path / "old.png", settings, "tiny")
    assert client.predict(handle_file(str(path)), api_name="/restore")[13] == 0.0

    settings["prior"] = 1.25
    path = save_png(np.zeros((16, 16, 3), np.uint8), tmp_path / "mild.png", settings, "tiny")
    assert client.predict(handle_file(str(path)), api_name="/restore")[13] == 1.25

    settings["prior"] = 7.0
    path = save_png(np.zeros((16, 16, 3), np.uint8), tmp_path / "strong.png", settings, "tiny")
    assert "class prior 7 is outside 0–5" in refused_restore(client, path)


def test_a_free_png_from_before_scene_guidance_restores_it_off(client, tmp_path: Path):
    from gradio_client import handle_file

    settings = {"mode": "free", "width": 256, "height": 256, "seed": 1, "scene": "lake"}
    settings["guidance"] = 5.0  # recorded, but format 1 sampled free pictures unguided
    old = PngImagePlugin.PngInfo()
    old.add_text(KEYWORD, json.dumps({"format": 1, "model": "tiny", "request": settings}))
    Image.new("RGB", (16, 16)).save(tmp_path / "old.png", pnginfo=old)
    restored = client.predict(handle_file(str(tmp_path / "old.png")), api_name="/restore")
    assert restored[3] == "lake" and restored[10] == 1.0

    path = save_png(np.zeros((16, 16, 3), np.uint8), tmp_path / "new.png", settings, "tiny")
    assert client.predict(handle_file(str(path)), api_name="/restore")[10] == 5.0


def test_a_composed_run_keeps_its_size_and_restores_compose(client, tmp_path: Path):
    from gradio_client import handle_file

    args = generate_args(layout_file(tmp_path, 64), 704, seed=2, compose=True)
    job = client.submit(*args, api_name="/generate")
    _, status, _, downloads, _ = job.result()

    assert "done" in status
    statuses = [output[1] for output in job.outputs()]
    assert any("(composing 192×192)" in text for text in statuses)
    assert any("(finishing" in text for text in statuses)  # the picture shows before its tokens
    result_png = downloads[0]
    assert Image.open(result_png).size == (704, 704)
    assert read_metadata(result_png)["request"]["compose"] is True
    restored = client.predict(handle_file(result_png), api_name="/restore")
    assert restored[12] is True


def test_restore_refuses_a_compose_setting_that_is_not_true_or_false(client, tmp_path: Path):

    path = save_png(
        np.zeros((16, 16, 3), np.uint8),
        tmp_path / "odd-compose.png",
        {"mode": "layout", "width": 512, "height": 512, "seed": 1, "compose": "yes"},
        "tiny",
    )
    assert "'compose' holds 'yes'" in refused_restore(client, path)


def test_a_free_only_bundle_opens_without_guidance_and_asks_for_a_scene(tmp_path: Path):
    tiny = Pipeline.tiny()
    vocabulary = Vocabulary.build({"image": 64}, ["free"])
    config = GPTConfig(
        image_vocab=64, cond_vocab=vocabulary.size, n_layer=1, n_head=2, n_embd=32,
        window_rows=4, window_cols=6,
    )  # fmt: skip
    pipeline = Pipeline("free-only", tiny.image_model, {}, GPT(config), vocabulary, tiny.palette)
    demo = build_app(pipeline, tmp_path)
    props = {c["props"].get("label"): c["props"] for c in demo.config["components"]}
    # the first (only) tab is Free with scene "any": nothing for guidance to steer toward
    assert props["Guidance (layout, sketch, scene; 1 = off)"]["visible"] is False
    assert props["Class prior (layout; 0 = off)"]["visible"] is False
    assert props["Status"]["value"].startswith("Ready. Choose a scene")
