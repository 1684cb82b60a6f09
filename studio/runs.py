"""One generation run as the studio keeps it: its request, result, files and stop switch.

The UI layer (studio.app) streams a run's previews; this module holds what a run leaves behind
(a record per run, PNGs with settings, the timelapse GIF) and the per-session stop switches.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.metadata import request_settings, save_png
from core.palette import Palette, label_map_image

__all__ = [
    "Run",
    "StopSwitches",
    "format_duration",
    "in_own_thread",
    "progress_text",
    "save_condition",
    "save_run",
    "tile",
    "write_timelapse",
]

_run_numbers = itertools.count(1)


class StopSwitches:
    """One stop event per browser session (or API client), for the run it has going."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        """A fresh event for a new run of this session (an earlier Stop does not carry over)."""
        event = threading.Event()
        with self._lock:
            self._events[session] = event
        return event

    def stop(self, session: str) -> bool:
        """Ask this session's run to stop; False when it has none going."""
        with self._lock:
            event = self._events.get(session)
        if event is None or event.is_set():
            return False
        event.set()
        return True

    def finish(self, session: str, event: threading.Event) -> None:
        """Forget the event of a run that ended (unless a newer run replaced it)."""
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]


@dataclass
class _Failure:
    error: BaseException


_FINISHED = object()


def in_own_thread(
    start: Callable[[], Iterator], stop: threading.Event, idle: float = 0.25
) -> Iterator:
    """Iterate a pipeline stream in one worker thread of its own and pass its items on.

    Gradio advances a generator handler from whichever worker thread is free, while torch's
    inference and no-grad modes hold per thread: the sampler must run in a single thread.
    Previews that pile up while the page is busy are thinned to the latest of each token row.
    While nothing arrives for `idle` seconds after a stop, None is passed on, so the page can
    say that the run is stopping. Leaving early (the page cancelled the event) sets `stop`.
    """
    items: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            for item in start():
                items.put(item)
        except BaseException as error:  # handed to the consumer, which raises it
            items.put(_Failure(error))
        finally:
            items.put(_FINISHED)

    threading.Thread(target=work, name="studio-sampler", daemon=True).start()
    try:
        while True:
            try:
                waiting = [items.get(timeout=idle)]
            except queue.Empty:
                if stop.is_set():
                    yield None
                continue
            while True:
                try:
                    waiting.append(items.get_nowait())
                except queue.Empty:
                    break
            for index, item in enumerate(waiting):
                if item is _FINISHED:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                later = waiting[index + 1] if index + 1 < len(waiting) else None
                if _same_row(item, later):
                    continue  # a newer preview of the same row is already here
                yield item
    finally:
        stop.set()


def _same_row(item: object, later: object) -> bool:
    rows = getattr(item, "rows_done", None)
    return rows is not None and getattr(later, "rows_done", None) == rows


@dataclass
class Run:
    """What one generate / resample / extend call produced."""

    number: int
    kind: str  # "generate", "resample" or "extend"
    request: Any  # core.pipeline.GenerateRequest, condition included
    images: list[np.ndarray]
    tokens: np.ndarray  # B×h×w
    frames: list[np.ndarray]
    settings: dict[str, Any]
    stopped: bool
    files: list[Path] = field(default_factory=list)  # one PNG per sample
    condition_file: Path | None = None

    def label(self, sample: int) -> str:
        """Caption under the gallery thumbnail."""
        mode = self.request.mode
        stopped = " (stopped)" if self.stopped else ""
        sample_note = f" #{sample + 1}" if len(self.images) > 1 else ""
        return f"{self.number}{sample_note}: {mode}, seed {self.request.seed}{stopped}"


def next_run_number() -> int:
    """Run numbers count up over the whole server, so file names never clash."""
    return next(_run_numbers)


def format_duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_text(preview: Any, label: str = "Sampling") -> str:
    """Status line for a Preview: rows, tokens, time spent and left."""
    stage = f" ({preview.stage})" if preview.stage else ""
    return (
        f"**{label}**{stage} row {preview.rows_done} / {preview.rows_total} · "
        f"{preview.tokens_done:,} / {preview.tokens_total:,} tokens · "
        f"{format_duration(preview.elapsed)} elapsed · about {format_duration(preview.eta)} left"
    )


def tile(images: list[np.ndarray], gap: int = 8) -> np.ndarray:
    """Samples side by side on a white strip, for the single preview image."""
    if len(images) == 1:
        return images[0]
    height = max(image.shape[0] for image in images)
    width = sum(image.shape[1] for image in images) + gap * (len(images) - 1)
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    left = 0
    for image in images:
        strip[: image.shape[0], left : left + image.shape[1]] = image
        left += image.shape[1] + gap
    return strip


def save_condition(request: Any, palette: Palette, path: Path) -> Path | None:
    """The condition of a request as a PNG (layout as palette ids in mode P); None for free."""
    condition = request.condition
    if condition is None:
        return None
    condition = np.asarray(condition)
    if request.mode == "layout":
        image = label_map_image(condition, palette)
    elif request.mode == "depth":
        image = Image.fromarray(np.round(np.clip(condition, 0, 1) * 65535).astype(np.uint16))
    else:  # sketch edges or RGB sketch, small superres photo
        image = Image.fromarray(condition.astype(np.uint8))
    image.save(path, format="PNG")
    return path


def save_run(run: Run, folder: Path, palette: Palette, model: str) -> None:
    """Write each sample as a PNG with settings in its metadata, and the condition beside it."""
    stem = f"landscape-{run.number:04d}-{run.request.mode}-seed{run.request.seed}"
    settings = request_settings(run.request)
    run.condition_file = save_condition(run.request, palette, folder / f"{stem}-condition.png")
    run.files = []
    for sample, image in enumerate(run.images):
        name = f"{stem}-{sample + 1}.png" if len(run.images) > 1 else f"{stem}.png"
        run.files.append(
            save_png(
                image,
                folder / name,
                settings,
                model,
                sample=sample,
                kind=run.kind,
                stopped=run.stopped,
                pipeline=run.settings,
            )
        )


def write_timelapse(
    frames: list[np.ndarray], final: np.ndarray, path: Path, max_side: int = 512
) -> Path:
    """A GIF of the raster-order sampling, one frame per token row, the final image held."""
    pictures = [*frames, final]
    height, width = final.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    images = [Image.fromarray(picture).convert("RGB").resize(size) for picture in pictures]
    durations = [80] * (len(images) - 1) + [2000]
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=durations,
        loop=0,
        optimize=False,
    )
    return path
