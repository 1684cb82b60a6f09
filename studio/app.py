"""The Gradio studio: paint a layout (or sketch, depth map, small photo), watch it grow row by row.

`build_app(pipeline)` lays out the page and wires every event (each with an api_name, so
gradio_client can drive the studio too); `Studio` holds the handlers. Sampling runs in
core.pipeline; this module turns controls into a GenerateRequest and streams what comes back.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from core.conditions import ConditionError
from core.metadata import MetadataError, read_metadata
from core.palette import LayoutError, Palette, flood_fill, ids_to_rgb
from core.pipeline import (
    COMPOSE_ABOVE,
    COMPOSE_ABOVE_FREE,
    COMPOSE_HEIGHTS,
    MAX_PRIOR,
    GenerateRequest,
    InputError,
    Pipeline,
    Preview,
    Result,
)
from core.sampler import MAX_GUIDANCE
from studio import canvas
from studio.runs import (
    Run,
    StopSwitches,
    in_own_thread,
    next_run_number,
    progress_text,
    save_run,
    tile,
    write_timelapse,
)

logger = logging.getLogger(__name__)

__all__ = ["Studio", "build_app", "launch"]

# Errors a user can cause; their messages are written for the user and shown as they are.
USER_ERRORS = (InputError, LayoutError, ConditionError, canvas.CanvasError, MetadataError)

MODE_LABELS = {
    "layout": "Layout",
    "sketch": "Sketch",
    "depth": "Depth",
    "superres": "Superres",
    "free": "Free",
}
ANY_SCENE = "any"
FIRST_STEP = {  # what the status asks for first, by the first tab a bundle offers
    "layout": "Paint a layout",
    "sketch": "Draw a sketch",
    "depth": "Paint or upload a depth map",
    "superres": "Upload a small photo",
    "free": "Choose a scene (or any)",
}
DEFAULT_SIZE = (512, 512)
MAX_SAMPLES = 4
DEFAULT_GUIDANCE = GenerateRequest.guidance  # the pipeline's default
DEFAULT_PRIOR = GenerateRequest.prior
SEED_RANGE = 2**31 - 1
PREVIEW_INTERVAL = 0.5  # seconds between previews inside one token row
KEEP_TIMELAPSES = 8  # runs whose timelapse frames stay in memory
TIMELAPSE_SIDE = 384  # frames are kept (and exported) at most this large

CSS = """
.legend td { padding: 1px 6px; font-size: 0.9em; }
.legend caption { caption-side: top; text-align: left; font-size: 0.8em; padding-bottom: 4px; }
.legend .swatch { display: inline-block; width: 1.4em; height: 1.0em;
                  border: 1px solid #8888; border-radius: 3px; vertical-align: middle; }
#status { min-height: 2.5em; }
"""

INTRO = """# Landscape studio
Paint a layout of sky, trees, water and mountains (or sketch edges, give a depth map or a small
photo), press **Generate** and watch the picture grow token row by token row. Unpainted areas are
*free*: the model decides what goes there."""


def swatch_names_script(palette: Palette) -> str:
    """A page script naming the brush swatches (tooltip and aria-label) after their classes."""
    entries = zip(
        [*palette.colours, palette.free_colour],
        [*palette.names, canvas.FREE_LEGEND],
        strict=True,
    )
    names = {f"rgb({r}, {g}, {b})": name for (r, g, b), name in entries}
    return f"""<script>
const studioSwatchNames = {json.dumps(names)};
new MutationObserver(() => {{
  for (const button of document.querySelectorAll("#layout-editor button.color")) {{
    const name = studioSwatchNames[button.style.backgroundColor];
    if (name && button.title !== name) {{
      button.title = name;
      button.setAttribute("aria-label", name);
    }}
  }}
}}).observe(document.documentElement, {{childList: true, subtree: true}});
</script>"""


@contextmanager
def user_errors() -> Iterator[None]:
    """Show errors the user caused as a message in the UI, never as a traceback."""
    try:
        yield
    except USER_ERRORS as error:
        # the user's mistake, not the server's: one log line, no traceback
        logger.info("refused: %s", error)
        raise gr.Error(str(error), print_exception=False) from None
    except gr.Error:
        raise
    except Exception as error:
        logger.exception("unexpected error in the studio")
        raise gr.Error(
            f"Something went wrong ({type(error).__name__}: {error}). The server log has details."
        ) from None


def keeps_outputs_when_refused(others: int):
    """For a handler whose last output is the status line and whose others show what the user
    made (a canvas, the sizes, the controls): a refusal becomes a warning pop-up and the status,
    and the others keep their values. (A raised gr.Error marks every output as failed, and the
    canvas and the size fields then show "Error" instead of what they held.)"""

    def wrap(handler):
        @functools.wraps(handler)
        def run(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except gr.Error as error:  # user_errors has logged it
                gr.Warning(error.message)
                return (*[gr.skip()] * others, error.message)

        return run

    return wrap


def _optional_int(value: float | None, off: int = 0) -> int | None:
    """Controls use 0 for "off"; the pipeline uses None."""
    return None if value is None or int(value) <= off else int(value)


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    """A smaller copy for timelapse frames kept in memory."""
    height, width = image.shape[:2]
    step = max(1, int(np.ceil(max(height, width) / max_side)))
    return np.ascontiguousarray(image[::step, ::step])


class Studio:
    """Event handlers of the studio, around one loaded pipeline."""

    def __init__(self, pipeline: Pipeline, folder: Path) -> None:
        self.pipeline = pipeline
        self.palette = pipeline.palette
        self.folder = folder
        self.switches = StopSwitches()

    # --- controls → request --------------------------------------------------------------

    def sampling(
        self,
        seed: float | None,
        temperature: float | None,
        top_k: float | None,
        top_p: float | None,
        window: float | None,
        guidance: float | None = None,
        prior: float | None = None,
    ) -> dict[str, Any]:
        """Sampling options from the controls, checked."""
        if seed is None or not 0 <= int(seed) <= SEED_RANGE:
            raise canvas.CanvasError(f"The seed must be a whole number from 0 to {SEED_RANGE}.")
        if temperature is None or not 0 < float(temperature) <= 5:
            raise canvas.CanvasError("The temperature must be above 0 (1.0 is the usual value).")
        if top_k is not None and int(top_k) < 0:
            raise canvas.CanvasError(f"Top-k must be 0 (off) or more, got {int(top_k)}.")
        if window is not None and int(window) < 0:
            raise canvas.CanvasError(
                f"The window must be 0 (as trained) or a number of token rows, got {int(window)}."
            )
        top_p_value = None if top_p is None or not 0 < float(top_p) < 1 else float(top_p)
        guidance = DEFAULT_GUIDANCE if guidance is None else float(guidance)
        if not 0 <= guidance <= MAX_GUIDANCE:
            raise canvas.CanvasError(
                f"The guidance must be from 0 to {MAX_GUIDANCE:g} (1 = none, "
                f"{DEFAULT_GUIDANCE:g} is the default)."
            )
        prior = DEFAULT_PRIOR if prior is None else float(prior)
        if not 0 <= prior <= MAX_PRIOR:
            raise canvas.CanvasError(
                f"The class prior must be from 0 to {MAX_PRIOR:g} (0 = off, {DEFAULT_PRIOR:g} is "
                "the default)."
            )
        return {
            "guidance": guidance,
            "prior": prior,
            "seed": int(seed),
            "temperature": float(temperature),
            "top_k": _optional_int(top_k),
            "top_p": top_p_value,
            "window": _optional_int(window),
        }

    def condition(
        self,
        mode: str,
        layout: dict | None,
        sketch: dict | None,
        depth: dict | None,
        width: int,
        height: int,
    ) -> np.ndarray | None:
        """The condition array of a canvas mode, at the output size."""
        if mode == "layout":
            ids = canvas.layout_from_canvas(layout, self.palette)
            return canvas.resize_ids(ids, width, height).astype(np.uint8)  # ids < 256
        if mode == "sketch":
            return canvas.resize_rgb(canvas.sketch_from_canvas(sketch), width, height)
        if mode == "depth":
            painted = canvas.depth_from_canvas(depth)
            if painted.max() - painted.min() < 1 / 255:  # one grey: no near and far to follow
                raise canvas.CanvasError(
                    "The depth canvas is one flat shade (black when untouched), so it says "
                    "nothing about near and far: "
                    "upload a depth map, paint one (near = bright) or estimate one from the layout."
                )
            return canvas.resize_depth(painted, width, height)
        return None

    def superres_size(self, photo: np.ndarray | None, factor: int) -> tuple[int, int]:
        """Output size of a superresolution, checked against the model's limit."""
        if photo is None:
            raise canvas.CanvasError("Upload a small photo to enlarge first.")
        height, width = photo.shape[:2]
        out_width, out_height = width * factor, height * factor
        limit = self.pipeline.max_side
        if max(out_width, out_height) > limit:
            raise canvas.CanvasError(
                f"×{factor} of a {width} × {height} photo would be {out_width} × {out_height}; "
                f"the limit is {limit} pixels a side. Use a smaller photo"
                + (" or ×4." if factor == 8 else ".")
            )
        return out_width, out_height

    def build_request(
        self,
        mode: str,
        layout: dict | None,
        sketch: dict | None,
        depth: dict | None,
        photo: np.ndarray | None,
        factor: float | None,
        scene: str | None,
        width: float | None,
        height: float | None,
        seed: float | None,
        temperature: float | None,
        top_k: float | None,
        top_p: float | None,
        window: float | None,
        guidance: float | None,
        num_samples: float | None,
        compose: bool | None = False,
        prior: float | None = None,
    ) -> GenerateRequest:
        """A GenerateRequest from the values of every control."""
        if mode not in self.pipeline.modes:
            offered = ", ".join(self.pipeline.modes)
            raise canvas.CanvasError(f"This model has no {mode!r} mode; it offers {offered}.")
        options = self.sampling(seed, temperature, top_k, top_p, window, guidance, prior)
        samples = int(num_samples or 1)
        if not 1 <= samples <= MAX_SAMPLES:
            raise canvas.CanvasError(f"Ask for 1 to {MAX_SAMPLES} samples at a time.")
        factor = int(factor or 4)
        condition = None
        if mode == "superres":
            photo = None if photo is None else np.asarray(photo)[..., :3].astype(np.uint8)
            width, height = self.superres_size(photo, factor)
            condition = photo
        else:
            width, height = canvas.check_size(width, height, self.pipeline.max_side)
            condition = self.condition(mode, layout, sketch, depth, width, height)
        return GenerateRequest(
            mode=mode,
            width=width,
            height=height,
            condition=condition,
            scene=_scene_for(mode, scene),
            superres_factor=factor,
            num_samples=samples,
            compose=bool(compose) and mode != "superres",
            **options,
        )

    # --- streaming runs --------------------------------------------------------------------

    def stream(
        self,
        kind: str,
        request: GenerateRequest,
        events: Iterator[Preview | Result | None],
        stop: Any,
        runs: list[Run],
    ) -> Iterator[tuple]:
        """Forward previews (at least one per token row), then store and show the result.

        Yields values for: preview, status, gallery, runs, selected, downloads, edit canvas.
        """
        skip = gr.skip()
        label = {"generate": "Sampling", "resample": "Resampling", "extend": "Extending"}[kind]
        yield skip, f"**{label}…** preparing", skip, skip, skip, skip, skip
        last_row, last_time, last_stage, told = -1, 0.0, "", False
        result: Result | None = None
        for event in events:
            if event is None:  # stopped; the pipeline decodes what it sampled
                if not told:
                    told = True
                    note = f"**Stopped** after row {max(last_row, 0)}; decoding the rows sampled…"
                    yield skip, note, *[skip] * 5
                continue
            if isinstance(event, Result):
                result = event
                break
            if (
                event.rows_done != last_row
                or event.stage != last_stage
                or event.elapsed - last_time >= PREVIEW_INTERVAL
            ):
                last_row, last_time, last_stage = event.rows_done, event.elapsed, event.stage
                yield tile(event.images), progress_text(event, label), *[skip] * 5
        if result is None:
            raise gr.Error("The model ended without a result; try again.")

        stopped = bool(getattr(result, "stopped", stop.is_set()))
        run = self.keep(kind, request, result, stopped, runs)
        runs = [*runs, run]
        selected = (len(runs) - 1, 0)
        gallery, files = self.gallery(runs), self.downloads(runs, selected)
        height, width = run.images[0].shape[:2]
        note = (
            "stopped early; the rows sampled so far are kept"
            if stopped
            else "done; download the PNG (settings inside) or edit it below"
        )
        status = f"**Run {run.number}** ({width} × {height}, seed {request.seed}): {note}."
        edit = self.edit_canvas(run.images[0])
        yield tile(run.images), status, gallery, runs, selected, files, edit

    def keep(
        self, kind: str, request: GenerateRequest, result: Result, stopped: bool, runs: list[Run]
    ) -> Run:
        """Make a Run of a Result, write its PNGs and trim old timelapses."""
        run = Run(
            number=next_run_number(),
            kind=kind,
            # the saved settings say what was used: no class prior outside layouts
            request=replace(request, prior=self.pipeline.prior_in_use(request)),
            images=[np.asarray(image, dtype=np.uint8) for image in result.images],
            tokens=np.asarray(result.tokens),
            frames=[_shrink(frame, TIMELAPSE_SIDE) for frame in result.frames],
            settings=dict(result.settings),
            stopped=stopped,
        )
        save_run(run, self.folder, self.palette, self.pipeline.name)
        for old in runs[:-KEEP_TIMELAPSES]:
            old.frames = []
        return run

    def generate(
        self,
        mode: str,
        layout: dict | None,
        sketch: dict | None,
        depth: dict | None,
        photo: np.ndarray | None,
        superres_factor: float | None,
        scene: str | None,
        width: float | None,
        height: float | None,
        seed: float | None,
        temperature: float | None,
        top_k: float | None,
        top_p: float | None,
        window: float | None,
        guidance: float | None,
        num_samples: float | None,
        compose: bool | None,
        prior: float | None,
        runs: list[Run],
        request: gr.Request,
    ) -> Iterator[tuple]:
        """Sample a new image from the controls, streaming previews."""
        with user_errors():
            job = self.build_request(
                mode,
                layout,
                sketch,
                depth,
                photo,
                superres_factor,
                scene,
                width,
                height,
                seed,
                temperature,
                top_k,
                top_p,
                window,
                guidance,
                num_samples,
                compose,
                prior,
            )
            stop = self.switches.start(request.session_hash)
            try:
                events = in_own_thread(lambda: self.pipeline.generate(job, stop=stop), stop)
                yield from self.stream("generate", job, events, stop, runs)
            finally:
                self.switches.finish(request.session_hash, stop)

    def stop(self, request: gr.Request) -> str:
        """Ask the run of this session to stop after the token it is on."""
        if self.switches.stop(request.session_hash):
            return "**Stopping…** the rows sampled so far will be kept."
        return "Nothing is running."

    # --- results ---------------------------------------------------------------------------

    @staticmethod
    def entries(runs: list[Run]) -> list[tuple[int, int]]:
        """(run index, sample) of each gallery item, newest run first."""
        return [
            (index, sample)
            for index in reversed(range(len(runs)))
            for sample in range(len(runs[index].images))
        ]

    def gallery(self, runs: list[Run]) -> list[tuple[str, str]]:
        """Gallery items: the result PNGs (settings inside) with captions."""
        return [
            (str(runs[index].files[sample]), runs[index].label(sample))
            for index, sample in self.entries(runs)
        ]

    @staticmethod
    def downloads(runs: list[Run], selected: tuple[int, int] | None) -> list[str]:
        """The selected result's PNG and its condition PNG."""
        if not runs or selected is None:
            return []
        run = runs[selected[0]]
        files = [str(run.files[selected[1]])]
        if run.condition_file is not None:
            files.append(str(run.condition_file))
        return files

    def edit_canvas(self, image: np.ndarray) -> dict:
        """The result as the background of the mask canvas, no mask painted yet."""
        return {"background": image, "layers": [], "composite": image}

    def select(self, runs: list[Run], index: int) -> tuple:
        """A gallery click: that result becomes the one to download, edit and export."""
        entries = self.entries(runs)
        if not 0 <= index < len(entries):
            raise gr.Error("Pick a result in the gallery first.", print_exception=False)
        run_index, sample = entries[index]
        run = runs[run_index]
        selected = (run_index, sample)
        status = f"Selected {run.label(sample)}."
        edit = self.edit_canvas(run.images[sample])
        return selected, self.downloads(runs, selected), edit, status

    def chosen(self, runs: list[Run], selected: tuple[int, int] | None) -> tuple[Run, int]:
        """The result picked for editing (the latest one unless another was clicked)."""
        if not runs:
            raise canvas.CanvasError("Generate an image first; there is no result to work on yet.")
        if selected is None:
            return runs[-1], 0
        return runs[selected[0]], selected[1]

    def timelapse(self, runs: list[Run], selected: tuple[int, int] | None) -> str:
        """A GIF of the chosen result's raster-order sampling."""
        with user_errors():
            run, _ = self.chosen(runs, selected)
            if not run.frames:
                raise canvas.CanvasError(
                    f"Run {run.number} keeps no timelapse frames (only the last "
                    f"{KEEP_TIMELAPSES} runs do); generate it again to export one."
                )
            path = self.folder / f"landscape-{run.number:04d}-timelapse.gif"
            return str(write_timelapse(run.frames, run.images[0], path, TIMELAPSE_SIDE))

    # --- editing results -------------------------------------------------------------------

    def resample(
        self,
        mask_canvas: dict | None,
        seed: float | None,
        temperature: float | None,
        top_k: float | None,
        top_p: float | None,
        window: float | None,
        guidance: float | None,
        prior: float | None,
        runs: list[Run],
        selected: tuple[int, int] | None,
        request: gr.Request,
    ) -> Iterator[tuple]:
        """Redo the painted part of the chosen result, streaming previews."""
        with user_errors():
            run, sample = self.chosen(runs, selected)
            image = run.images[sample]
            mask = canvas.mask_from_canvas(mask_canvas, image.shape[:2])
            options = self.sampling(seed, temperature, top_k, top_p, window, guidance, prior)
            job = replace(run.request, num_samples=1, **options)
            tokens = run.tokens[sample : sample + 1]
            stop = self.switches.start(request.session_hash)
            try:
                events = in_own_thread(
                    lambda: self.pipeline.resample(job, tokens, mask, stop=stop), stop
                )
                yield from self.stream("resample", job, events, stop, runs)
            finally:
                self.switches.finish(request.session_hash, stop)

    def extend(
        self,
        right: float | None,
        down: float | None,
        seed: float | None,
        temperature: float | None,
        top_k: float | None,
        top_p: float | None,
        window: float | None,
        guidance: float | None,
        prior: float | None,
        runs: list[Run],
        selected: tuple[int, int] | None,
        request: gr.Request,
    ) -> Iterator[tuple]:
        """Grow the chosen result to the right and/or downward, streaming previews."""
        with user_errors():
            run, sample = self.chosen(runs, selected)
            right, down = int(right or 0), int(down or 0)
            if right < 0 or down < 0 or right + down == 0:
                raise canvas.CanvasError("Give a number of pixels to add to the right or below.")
            height, width = run.images[sample].shape[:2]
            limit = self.pipeline.max_side
            if max(width + right, height + down) > limit:
                raise canvas.CanvasError(
                    f"Extended, the image would be {width + right} × {height + down}; the limit "
                    f"is {limit} pixels a side."
                )
            options = self.sampling(seed, temperature, top_k, top_p, window, guidance, prior)
            job = replace(run.request, num_samples=1, width=width, height=height, **options)
            grown = self.pipeline.grown(job, right, down)  # what the result's PNG records
            tokens = run.tokens[sample : sample + 1]
            stop = self.switches.start(request.session_hash)
            try:
                events = in_own_thread(
                    lambda: self.pipeline.extend(job, tokens, right, down, stop=stop), stop
                )
                yield from self.stream("extend", grown, events, stop, runs)
            finally:
                self.switches.finish(request.session_hash, stop)

    # --- canvases --------------------------------------------------------------------------

    def new_canvases(self, width: float | None, height: float | None) -> tuple:
        """Blank layout, sketch and depth canvases of the chosen size."""
        with user_errors():
            width, height = canvas.check_size(width, height, self.pipeline.max_side)
            return (
                canvas.blank_canvas(width, height),
                canvas.grey_canvas(width, height, 255),
                canvas.grey_canvas(width, height, 0),
                f"New {width} × {height} canvases.",
            )

    def scale_canvases(
        self, layout, sketch, depth, width: float | None, height: float | None
    ) -> tuple:
        """The canvases scaled to a new size (a preset chosen), keeping what was painted."""
        with user_errors():
            width, height = canvas.check_size(width, height, self.pipeline.max_side)
            scaled = canvas.scaled_canvases(layout, sketch, depth, width, height, self.palette)
            return (
                *scaled,
                f"Canvases scaled to {width} × {height}, painting kept; New canvas clears them.",
            )

    def snapped_layout(self, layout: dict | None) -> np.ndarray | None:
        """The layout as the model will read it (snapped colours, free in grey)."""
        try:
            return ids_to_rgb(canvas.edited_layout(layout, self.palette), self.palette)
        except USER_ERRORS:
            return None

    def fill(self, layout: dict | None, class_name: str, x: float | None, y: float | None):
        """Give the region under (x, y) the chosen class (server-side flood fill)."""
        with user_errors():
            if x is None or y is None:
                raise canvas.CanvasError("Click the layout preview where the fill should start.")
            ids = canvas.edited_layout(layout, self.palette)
            filled = flood_fill(ids, (int(x), int(y)), self.palette.id_of(class_name), self.palette)
            return canvas.layout_canvas(filled, self.palette), ids_to_rgb(filled, self.palette)

    @keeps_outputs_when_refused(3)
    def load_layout(self, path: str | None) -> tuple:
        """An uploaded label map or palette image onto the layout canvas; sizes follow it."""
        with user_errors():
            if path is None:
                raise canvas.CanvasError("Choose a label map (PNG of ids) or a palette image.")
            ids = canvas.read_layout_upload(path, self.palette)
            height, width = ids.shape
            canvas.check_size(width, height, self.pipeline.max_side)
            status = f"Loaded a {width} × {height} layout from {Path(path).name}."
            return canvas.layout_canvas(ids, self.palette), width, height, status

    @keeps_outputs_when_refused(3)
    def load_sketch(self, path: str | None) -> tuple:
        """An uploaded drawing onto the sketch canvas, in grey; sizes follow it."""
        with user_errors():
            if path is None:
                raise canvas.CanvasError(
                    "Choose a drawing (dark lines on light paper or the reverse)."
                )
            grey = canvas.read_sketch_upload(path)
            height, width = grey.shape[:2]
            canvas.check_size(width, height, self.pipeline.max_side)
            status = f"Loaded a {width} × {height} drawing from {Path(path).name}."
            return canvas.grey_picture_canvas(grey), width, height, status

    @keeps_outputs_when_refused(1)
    def load_depth(self, path: str | None) -> tuple:
        """An uploaded depth file onto the depth canvas."""
        with user_errors():
            if path is None:
                raise canvas.CanvasError("Choose a depth map file.")
            depth = canvas.read_depth_upload(path)
            return canvas.depth_canvas(depth), f"Loaded depth map {Path(path).name}."

    @keeps_outputs_when_refused(1)
    def estimate_depth(self, layout: dict | None) -> tuple:
        """A depth map guessed from the Layout tab's canvas."""
        with user_errors():
            ids = canvas.layout_from_canvas(layout, self.palette)
            depth = np.asarray(self.pipeline.estimate_depth(ids), dtype=np.float32)
            return canvas.depth_canvas(depth), "Estimated a depth map from the layout."

    # --- settings --------------------------------------------------------------------------

    @keeps_outputs_when_refused(15)
    def restore(self, path: str | None) -> tuple:
        """Controls set from the settings inside a studio PNG."""
        with user_errors():
            if path is None:
                raise MetadataError("Choose a PNG saved by the studio.")
            document = read_metadata(path)
            request = document["request"]
            mode = request["mode"]
            if mode not in self.pipeline.modes:
                raise MetadataError(
                    f"{Path(path).name} was made in {mode!r} mode, which this model lacks."
                )
            model = document.get("model")
            note = f" (made with model {model})" if model and model != self.pipeline.name else ""
            name = Path(path).name

            def value(key: str, kind, default=None):
                raw = request.get(key, default)
                try:
                    return kind(raw if raw is not None else default)
                except (TypeError, ValueError):
                    raise MetadataError(
                        f"{name}: the setting {key!r} holds {raw!r}, which is not a usable value."
                    ) from None

            guidance = value("guidance", float, 1.0)
            if mode == "free" and document.get("format", 1) < 2:
                guidance = 1.0  # free pictures were not guided before format 2
            if not 0 <= guidance <= MAX_GUIDANCE:
                raise MetadataError(
                    f"{name}: its guidance {guidance:g} is outside 0–{MAX_GUIDANCE:g}; restore "
                    "another PNG or set the guidance by hand."
                )
            prior = value("prior", float, 0.0)  # PNGs from before the prior: made without it
            if not 0 <= prior <= MAX_PRIOR:
                raise MetadataError(
                    f"{name}: its class prior {prior:g} is outside 0–{MAX_PRIOR:g}; restore "
                    "another PNG or set the prior by hand."
                )
            if mode != "layout":  # made without the prior: the slider keeps the user's value
                prior = gr.skip()
            compose = request.get("compose", False)  # PNGs from before composing: direct
            if not isinstance(compose, bool):
                raise MetadataError(
                    f"{name}: the setting 'compose' holds {compose!r}, which is not true or false."
                )
            width, height = value("width", int), value("height", int)
            low, high = self.pipeline.factor, self.pipeline.max_side
            if not (low <= width <= high and low <= height <= high):
                raise MetadataError(
                    f"{name}: its size {width} × {height} is outside {low}–{high} px a side."
                )
            return (
                mode,
                gr.Tabs(selected=mode),
                width,
                height,
                request.get("scene") or ANY_SCENE,
                value("superres_factor", int, 4) or 4,
                value("seed", int),
                value("temperature", float, 1.0),
                value("top_k", int, 0),
                value("top_p", float, 1.0) or 1.0,
                value("window", int, 0),
                guidance,
                value("num_samples", int, 1) or 1,
                compose,
                prior,
                f"Restored the settings of {Path(path).name}{note}.",
            )


def ready_for(mode: str) -> str:
    """The status line that says what to do first in a mode's tab."""
    return f"Ready. {FIRST_STEP[mode]}, then press **Generate**."


def _scene_for(mode: str, scene: str | None) -> str | None:
    """The request's scene from the Scene menu: free mode only, and "any" is none."""
    return None if mode != "free" or scene in (None, ANY_SCENE) else scene


def sliders_shown(pipeline: Pipeline, mode: str, scene: str | None) -> tuple[bool, bool]:
    """Whether the guidance and the class prior sliders show: where the pipeline would use
    them for a request of this mode and scene."""
    request = GenerateRequest(mode, scene=_scene_for(mode, scene))
    return pipeline.guided(request), pipeline.prior_in_use(request) > 0


def build_app(pipeline: Pipeline, folder: Path | None = None) -> gr.Blocks:
    """The studio's page around a loaded pipeline; files go to `folder` (a temp dir if None)."""
    folder = Path(folder or tempfile.mkdtemp(prefix="landscape-studio-"))
    folder.mkdir(parents=True, exist_ok=True)
    studio = Studio(pipeline, folder)
    palette = pipeline.palette
    width0, height0 = DEFAULT_SIZE

    with gr.Blocks(title="Landscape studio") as demo:
        gr.Markdown(INTRO)
        runs = gr.State([])
        selected = gr.State(None)
        offered = set(pipeline.modes)  # tabs of modes the model was not trained for are hidden
        first_mode = pipeline.modes[0]
        mode = gr.Textbox(value=first_mode, visible=False, label="Mode")
        guidance_shown, prior_shown = sliders_shown(pipeline, first_mode, ANY_SCENE)

        # The number fields carry no minimum or maximum: the studio checks them when a run
        # starts, with a message that names the field (gradio's own names none).
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                with gr.Row():
                    preset = gr.Dropdown(
                        [*canvas.PRESETS, canvas.CUSTOM],
                        value="512 × 512",
                        label="Canvas size",
                        scale=2,
                    )
                    width = gr.Number(width0, label="Width (px)", precision=0, scale=1)
                    height = gr.Number(height0, label="Height (px)", precision=0, scale=1)
                    new_canvas = gr.Button("New canvas", scale=1, elem_id="new-canvas")

                with gr.Tabs(selected=first_mode) as tabs:
                    with gr.Tab(
                        MODE_LABELS["layout"], id="layout", visible="layout" in offered
                    ) as layout_tab:
                        with gr.Row(equal_height=False):
                            layout = gr.ImageEditor(
                                value=canvas.blank_canvas(width0, height0),
                                label="Layout (unpainted = free)",
                                type="numpy",
                                image_mode="RGBA",
                                sources=(),
                                transforms=(),
                                layers=False,
                                format="png",
                                canvas_size=(width0, height0),
                                brush=gr.Brush(
                                    colors=canvas.brush_colours(palette),
                                    default_color=canvas.hex_colour(palette.colours[1]),
                                    color_mode="fixed",
                                    default_size=24,
                                ),
                                eraser=gr.Eraser(default_size=24),
                                elem_id="layout-editor",
                                scale=4,
                            )
                            with gr.Column(scale=1, min_width=180):
                                gr.HTML(canvas.legend_html(palette), elem_id="legend")
                                layout_upload = gr.UploadButton(
                                    "Upload label map…",
                                    file_types=["image"],
                                    size="sm",
                                )
                        with gr.Accordion("Fill a region", open=False) as fill_panel:
                            with gr.Row():
                                fill_class = gr.Dropdown(
                                    [*palette.names, "free"],
                                    value=palette.names[1],
                                    label="Fill with",
                                )
                                fill_x = gr.Number(label="x", precision=0)
                                fill_y = gr.Number(label="y", precision=0)
                                fill_button = gr.Button("Fill")
                                show_layout = gr.Button("Show layout")
                            layout_preview = gr.Image(
                                label="The layout as the model reads it: click a region to fill",
                                interactive=False,
                                format="png",
                                elem_id="layout-preview",
                            )
                    with gr.Tab(
                        MODE_LABELS["sketch"], id="sketch", visible="sketch" in offered
                    ) as sketch_tab:
                        sketch = gr.ImageEditor(
                            value=canvas.grey_canvas(width0, height0, 255),
                            label="Sketch: dark strokes on white",
                            type="numpy",
                            image_mode="RGB",
                            sources=("upload", "clipboard"),
                            transforms=(),
                            layers=False,
                            format="png",
                            canvas_size=(width0, height0),
                            brush=gr.Brush(
                                colors=["#000000", "#404040"],
                                color_mode="fixed",
                                default_size=3,
                            ),
                            eraser=gr.Eraser(default_size=16),
                        )
                        sketch_upload = gr.UploadButton(
                            "Upload a drawing…",
                            file_types=["image"],
                            size="sm",
                        )
                    with gr.Tab(
                        MODE_LABELS["depth"], id="depth", visible="depth" in offered
                    ) as depth_tab:
                        depth = gr.ImageEditor(
                            value=canvas.grey_canvas(width0, height0, 0),
                            label="Depth: near = bright, far = dark",
                            type="numpy",
                            image_mode="RGB",
                            sources=(),
                            transforms=(),
                            layers=False,
                            format="png",
                            canvas_size=(width0, height0),
                            brush=gr.Brush(
                                colors=["#ffffff", "#c0c0c0", "#808080", "#404040", "#000000"],
                                color_mode="fixed",
                                default_size=32,
                            ),
                            eraser=False,
                        )
                        with gr.Row():
                            depth_upload = gr.UploadButton(
                                "Upload depth map…",
                                file_types=["image", ".npy", ".tif", ".tiff"],
                                size="sm",
                            )
                            estimate = gr.Button("Estimate from layout", size="sm")
                    with gr.Tab(
                        MODE_LABELS["superres"], id="superres", visible="superres" in offered
                    ) as superres_tab:
                        photo = gr.Image(
                            label="Small photo to enlarge",
                            elem_id="photo",
                            type="numpy",
                            image_mode="RGB",
                            sources=["upload", "clipboard"],
                        )
                        factor = gr.Radio([("×4", 4), ("×8", 8)], value=4, label="Enlarge by")
                    with gr.Tab(
                        MODE_LABELS["free"], id="free", visible="free" in offered
                    ) as free_tab:
                        scene = gr.Dropdown(
                            [ANY_SCENE, *pipeline.scenes],
                            value=ANY_SCENE,
                            label="Scene",
                            info="'any' samples without a condition.",
                        )

                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0)
                        dice = gr.Button("Random seed", scale=0, min_width=90, elem_id="dice")
                        samples = gr.Slider(1, MAX_SAMPLES, value=1, step=1, label="Samples")
                    with gr.Row():
                        temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
                        top_k = gr.Number(100, label="Top-k (0 = off)", precision=0)
                        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (1 = off)")
                        window = gr.Number(
                            0,
                            label="Window (tokens, 0 = as trained)",
                            precision=0,
                        )
                    with gr.Row():
                        guidance = gr.Slider(
                            0.0,
                            MAX_GUIDANCE,
                            value=DEFAULT_GUIDANCE,
                            step=0.25,
                            label="Guidance (layout, sketch, scene; 1 = off)",
                            info="How closely to follow the painting or the scene; twice the "
                            "work when not 1.",
                            visible=guidance_shown,
                        )
                        prior = gr.Slider(
                            0.0,
                            MAX_PRIOR,
                            value=DEFAULT_PRIOR,
                            step=0.25,
                            label="Class prior (layout; 0 = off)",
                            info="Leans each painted region toward image codes that its class "
                            "covers in the training photos.",
                            visible=prior_shown,
                        )
                    compose = gr.Checkbox(
                        value=True,
                        label="Compose at photo scale, then enlarge",
                        info=(
                            f"Pictures over {COMPOSE_ABOVE} px high ({COMPOSE_ABOVE_FREE} in "
                            "Free mode): the model composes one "
                            f"{COMPOSE_HEIGHTS[0]}–{COMPOSE_HEIGHTS[1]} px high, the scale of its "
                            "training photos, then enlarges it with its superres mode. Off: it "
                            "samples the full size directly, repeating photo-sized detail."
                        ),
                    )
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")

            with gr.Column(scale=5):
                status = gr.Markdown(
                    ready_for(first_mode),
                    label="Status",
                    elem_id="status",
                )
                preview = gr.Image(
                    label="Preview",
                    interactive=False,
                    format="jpeg",
                    elem_id="preview",
                )
                gallery = gr.Gallery(
                    label="This session's results (click one to download, edit or export)",
                    columns=4,
                    height="auto",
                    format="png",
                    allow_preview=False,
                    object_fit="contain",
                    elem_id="gallery",
                )
                downloads = gr.File(
                    label="Download: result PNG (settings inside) and its condition",
                    file_count="multiple",
                    interactive=False,
                    height=130,
                    elem_id="downloads",
                )
                with gr.Row():
                    timelapse = gr.Button("Export timelapse GIF", size="sm")
                    restore_upload = gr.UploadButton(
                        "Restore settings from PNG…", file_types=[".png"], size="sm"
                    )
                timelapse_file = gr.File(
                    label="Timelapse GIF", interactive=False, height=90, elem_id="timelapse"
                )
                with gr.Accordion("Edit the selected result", open=False):
                    mask = gr.ImageEditor(
                        label="Paint over the part to redo",
                        type="numpy",
                        image_mode="RGBA",
                        sources=(),
                        transforms=(),
                        layers=False,
                        format="png",
                        brush=gr.Brush(
                            colors=[("#ff3040", 0.6)], color_mode="fixed", default_size=32
                        ),
                        eraser=gr.Eraser(default_size=32),
                    )
                    resample = gr.Button("Resample painted region")
                    with gr.Row():
                        whole = f"rounded up to whole {pipeline.factor} px tokens"
                        extend_right = gr.Number(
                            256, label="Add to the right (px)", info=whole, precision=0
                        )
                        extend_down = gr.Number(0, label="Add below (px)", info=whole, precision=0)
                        extend = gr.Button("Extend")

        # --- events ---------------------------------------------------------------------
        controls = [mode, layout, sketch, depth, photo, factor, scene, width, height]
        controls += [seed, temperature, top_k, top_p, window, guidance, samples, compose, prior]
        sampling = [seed, temperature, top_k, top_p, window, guidance, prior]
        run_outputs = [preview, status, gallery, runs, selected, downloads, mask]
        run_options = dict(
            outputs=run_outputs,
            show_progress="hidden",
            concurrency_id="sampling",
            concurrency_limit=1,
        )

        failed = "Ready. The last request could not run; the message says why."
        for button, handler, inputs, name in [
            (generate, studio.generate, [*controls, runs], "generate"),
            (resample, studio.resample, [mask, *sampling, runs, selected], "resample"),
            (
                extend,
                studio.extend,
                [extend_right, extend_down, *sampling, runs, selected],
                "extend",
            ),
        ]:
            button.click(handler, inputs, api_name=name, **run_options).failure(
                lambda: failed,
                None,
                status,
                api_name=f"{name}_failed",
                api_visibility="undocumented",
                show_progress="hidden",
            )
        stop.click(
            studio.stop,
            None,
            status,
            api_name="stop",
            concurrency_limit=None,
            show_progress="hidden",
        )

        dice.click(lambda: random.randint(0, SEED_RANGE), None, seed, api_name="random_seed")
        for tab, name in [
            (layout_tab, "layout"),
            (sketch_tab, "sketch"),
            (depth_tab, "depth"),
            (superres_tab, "superres"),
            (free_tab, "free"),
        ]:
            tab.select(
                lambda name=name: name,
                None,
                mode,
                api_name=f"mode_{name}",
                api_visibility="undocumented",
            )

        def sliders_for(current: str, chosen_scene: str | None):
            shown = sliders_shown(pipeline, current, chosen_scene)
            return tuple(gr.update(visible=visible) for visible in shown)

        def status_for(current: str, shown: str):
            """A tab's first step replaces a "Ready." line; a run's outcome stays."""
            return ready_for(current) if shown.startswith("Ready.") else gr.skip()

        mode.change(
            status_for, [mode, status], status, api_visibility="private", show_progress="hidden"
        )
        for changed in (mode, scene):
            changed.change(
                sliders_for,
                [mode, scene],
                [guidance, prior],
                api_visibility="private",
                show_progress="hidden",
            )

        def on_preset(choice: str):
            if choice not in canvas.PRESETS:
                return gr.skip(), gr.skip()
            return canvas.PRESETS[choice]

        # The user's choice scales the canvases to the preset; the menu follows the size fields
        # (typed, restored from a PNG or set by an uploaded label map) without touching them.
        preset.input(on_preset, preset, [width, height], api_name="preset").then(
            studio.scale_canvases,
            [layout, sketch, depth, width, height],
            [layout, sketch, depth, status],
            api_name="preset_canvas",
            api_visibility="undocumented",
        )
        for field in (width, height):
            field.change(
                canvas.preset_name,
                [width, height],
                preset,
                api_visibility="private",
                show_progress="hidden",
            )
        new_canvas.click(
            studio.new_canvases,
            [width, height],
            [layout, sketch, depth, status],
            api_name="new_canvas",
        )
        # The editor does not report every stroke, so the snapped view is also refreshed when
        # the fill panel opens and on request.
        for trigger, name, visibility in [
            (layout.change, "snapped_layout", "public"),
            (layout.input, "snapped_layout_input", "undocumented"),
            (fill_panel.expand, "snapped_layout_expand", "undocumented"),
            (show_layout.click, "show_layout", "undocumented"),
        ]:
            trigger(
                studio.snapped_layout,
                layout,
                layout_preview,
                show_progress="hidden",
                trigger_mode="always_last",
                api_name=name,
                api_visibility=visibility,
            )

        def pick_point(event: gr.SelectData):
            x, y = event.index
            return x, y

        layout_preview.select(
            pick_point,
            None,
            [fill_x, fill_y],
            api_name="pick_point",
            api_visibility="undocumented",
        ).then(
            studio.fill,
            [layout, fill_class, fill_x, fill_y],
            [layout, layout_preview],
            api_name="fill_at_point",
            api_visibility="undocumented",
        )
        fill_button.click(
            studio.fill,
            [layout, fill_class, fill_x, fill_y],
            [layout, layout_preview],
            api_name="fill",
        )
        layout_upload.upload(
            studio.load_layout,
            layout_upload,
            [layout, width, height, status],
            api_name="load_layout",
        )
        sketch_upload.upload(
            studio.load_sketch,
            sketch_upload,
            [sketch, width, height, status],
            api_name="load_sketch",
        )
        depth_upload.upload(studio.load_depth, depth_upload, [depth, status], api_name="load_depth")

        # A photo that is no image would fail later, inside Gradio, with no word on why: checked
        # as it arrives (raw, unprocessed), it is dropped at once with a message. (The sketch
        # editor reads uploads in the browser and ignores a bad file without sending it.)
        def refuse_unreadable_photo(payload):
            message = canvas.unreadable_upload(payload, "a photo")
            if message is None:
                return gr.skip(), gr.skip()
            gr.Warning(message)
            return None, message

        photo.upload(
            refuse_unreadable_photo,
            photo,
            [photo, status],
            preprocess=False,
            api_visibility="private",
        )
        estimate.click(studio.estimate_depth, layout, [depth, status], api_name="estimate_depth")

        def on_select(session_runs: list[Run], event: gr.SelectData):
            with user_errors():
                return studio.select(session_runs, event.index)

        gallery.select(
            on_select, runs, [selected, downloads, mask, status], api_name="select_result"
        )
        timelapse.click(studio.timelapse, [runs, selected], timelapse_file, api_name="timelapse")
        restore_upload.upload(
            studio.restore,
            restore_upload,
            [
                mode,
                tabs,
                width,
                height,
                scene,
                factor,
                seed,
                temperature,
                top_k,
                top_p,
                window,
                guidance,
                samples,
                compose,
                prior,
                status,
            ],
            api_name="restore",
        )
    demo.studio_folder = folder  # type: ignore[attr-defined]
    return demo


def launch(
    pipeline: Pipeline,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
) -> None:
    """Build the studio and serve it until interrupted."""
    demo = build_app(pipeline)
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        css=CSS,
        head=swatch_names_script(pipeline.palette),
        allowed_paths=[str(demo.studio_folder)],
        show_error=False,
    )
