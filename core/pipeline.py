"""The generation pipeline the studio calls: condition map in, streamed previews, image out.

`Pipeline` holds a bundle (image VQGAN, condition stages, transformer), turns a user's
condition (layout ids, sketch, depth map, small photo, or nothing) into condition tokens, runs
the windowed sampler and yields cheap previews (a per-code patch table, no decoder run) at
least once per token row, then one full decode. No UI code lives here.

Padding rule: a canvas whose size is not a multiple of the token size f is padded on the right
and bottom to the next multiple by repeating its last column / row; the condition and image
token grids therefore align, and the output is cropped back to the requested size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.checkpoint import CheckpointError, read_manifest
from core.condition_stages import condition_input
from core.conditions import (
    ConditionError,
    back_project,
    depth_from_array,
    estimate_depth_from_layout,
    resize_edges,
    sketch_to_edges,
    upsample_bicubic,
)
from core.data import to_tensor, to_uint8
from core.layout_cells import LayoutCells
from core.layout_prior import PRIOR_FILE, cell_majority, load_prior
from core.models import (
    SCENES,
    SUPERRES_TASKS,
    Vocabulary,
    load_stage,
    load_transformer,
    load_vqgan,
)
from core.palette import LayoutError, Palette, check_layout
from core.sampler import Condition, SamplingOptions, grid_for_pixels, sample
from core.transformer import GPT, GPTConfig
from core.vqgan import VQGAN, VQGANConfig

logger = logging.getLogger(__name__)

MODES = ("layout", "sketch", "depth", "superres", "free")
MODE_TASK = {"layout": "layout", "sketch": "edges", "depth": "depth", "free": "free"}
STAGE_ROLES = ("layout", "edges", "depth")
# Modes with an empty condition to guide away from (depth and photos have none).
GUIDED_TASKS = ("layout", "edges")
DECODE_TILE = 32  # tokens per side of a decoder tile: bounded memory at any output size
# Composing (GenerateRequest.compose): the bundled transformer learnt from photos 160 px high, so
# a picture far higher than that gets photo-sized detail repeated over each painted region. A
# picture over COMPOSE_ABOVE px high is therefore composed between COMPOSE_HEIGHTS, then
# enlarged with superres. With a layout or sketch, 512 px direct sampling still holds together
# and composing at 192 px loses narrow bands, so it starts above that; free mode has nothing to
# hold it together, so already a 512 px picture becomes a patchwork: it composes above 256 px.
COMPOSE_ABOVE = 640
COMPOSE_ABOVE_FREE = 256
COMPOSE_HEIGHTS = (192, 320)
MAX_PRIOR = 5.0  # the class prior's weight (GenerateRequest.prior): the studio's slider, the CLI


class InputError(ValueError):
    """The user's input cannot be used; the message says what to change."""


@dataclass
class GenerateRequest:
    mode: str
    width: int = 512
    height: int = 512
    condition: np.ndarray | None = None
    scene: str | None = None
    superres_factor: int = 4
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = 100
    top_p: float | None = None
    # classifier-free guidance in layout and sketch modes and in free mode with a scene class
    # (1 = none); 5 kept the most of held-out val layouts and showed scenes most often for the
    # bundled models (sweeps in checkpoints/transformer/card.md)
    guidance: float = 5.0
    window: int | None = None  # window rows in tokens; None = the model's trained window
    num_samples: int = 1
    # Over COMPOSE_ABOVE px high (free mode: COMPOSE_ABOVE_FREE): sample a picture 192–320 px
    # high, enlarge it ×4 (×8 past 1280 px) with the superres task, and scale that to the size
    # (see Pipeline.compose_plan).
    compose: bool = False
    # layout mode, with a bundle that has a layout prior (core.layout_prior): each painted cell
    # adds prior × log P(its class | code) to the logits; 0 = off. 3 kept the most of held-out
    # val layouts (sweep in checkpoints/transformer/card.md)
    prior: float = 3.0


@dataclass
class Preview:
    images: list[np.ndarray]
    rows_done: int
    rows_total: int
    tokens_done: int
    tokens_total: int
    elapsed: float
    eta: float
    stage: str = ""  # composed runs: which pass ("composing 320×208", "enlarging ×4")


@dataclass
class Result:
    images: list[np.ndarray]
    tokens: np.ndarray
    frames: list[np.ndarray]
    settings: dict
    stopped: bool = False
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _pad_to(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Repeat the last row / column so the array is height × width (the padding rule)."""
    pad_h, pad_w = height - array.shape[0], width - array.shape[1]
    if pad_h < 0 or pad_w < 0:
        return array[:height, :width]
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, mode="edge")


class Pipeline:
    """A loaded bundle, ready to generate."""

    max_side = 2048

    def __init__(
        self,
        name: str,
        image_model: VQGAN,
        stages: dict[str, VQGAN | LayoutCells],
        transformer: GPT,
        vocabulary: Vocabulary,
        palette: Palette,
        identity: str = "",
    ):
        self.name = name
        self.image_model = image_model.eval()
        self.stages = {k: v.eval() for k, v in stages.items()}
        self.transformer = transformer.eval()
        self.vocabulary = vocabulary
        self.palette = palette
        self.identity = identity
        self.factor = image_model.factor
        tasks = vocabulary.tasks()
        self.modes = [m for m in MODES if self._task_for(m, 4) in tasks or self._has_superres(m)]
        self.scenes = list(SCENES) if "free" in tasks else []
        self._patches = self._patch_table()
        self.layout_prior: torch.Tensor | None = None  # classes × image vocab: log P(class | code)
        self.image_tokens = ""  # the hash naming the image VQGAN's tokens (Pipeline.load sets it)

    def _has_superres(self, mode: str) -> bool:
        return mode == "superres" and any(t in self.vocabulary.tasks() for t in SUPERRES_TASKS)

    @staticmethod
    def _task_for(mode: str, factor: int) -> str:
        return f"superres{factor}" if mode == "superres" else MODE_TASK[mode]

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, folder: str | Path) -> Pipeline:
        """A bundle folder (with bundle.yaml) as written by `train.py bundle`."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if "image" not in manifest or "transformer" not in manifest:
            raise CheckpointError(
                f"{folder}/bundle.yaml must name an 'image' VQGAN and a 'transformer'; "
                "rebuild it with python train.py bundle"
            )
        transformer = load_transformer(folder / manifest["transformer"]["folder"])
        image_model, image_tokens = load_vqgan(folder / manifest["image"]["folder"], "image")
        stages = {}
        for role, sha in transformer.stage_hashes.items():
            if role not in manifest or manifest[role]["weights_sha256"] != sha:
                raise CheckpointError(
                    f"{folder}: the transformer was trained with a '{role}' stage whose weights "
                    "are not in this bundle; use the stage folders it was trained with"
                )
            if role in STAGE_ROLES:
                stages[role], _ = load_stage(folder / manifest[role]["folder"], role)
        extra = transformer.extra
        palette = Palette.default()
        if "palette" in extra:
            colours = tuple(tuple(c) for c in extra["palette"]["colours"])
            palette = Palette(tuple(extra["palette"]["names"]), colours)
        name = extra.get("name") or folder.resolve().name
        pipeline = cls(
            name,
            image_model,
            stages,
            transformer.model,
            transformer.vocabulary,
            palette,
            transformer.weights_sha256[:12],
        )
        pipeline.image_tokens = image_tokens
        if (folder / PRIOR_FILE).is_file():
            pipeline.layout_prior = load_prior(folder / PRIOR_FILE, image_tokens)
        return pipeline

    @classmethod
    def tiny(cls, seed: int = 0) -> Pipeline:
        """Untrained tiny models with every mode: for tests and UI work, not for pictures."""
        torch.manual_seed(seed)
        palette = Palette.default()
        base = dict(channels=8, channel_mult=[1, 1, 1, 1, 1], z_channels=8, code_dim=8)
        image_model = VQGAN(VQGANConfig(codebook_size=64, **base))
        stages = {
            "layout": VQGAN(
                VQGANConfig(
                    in_channels=palette.num_condition_classes,
                    out_channels=palette.num_condition_classes,
                    codebook_size=32,
                    **base,
                )
            ),
            "edges": VQGAN(VQGANConfig(in_channels=1, out_channels=1, codebook_size=32, **base)),
            "depth": VQGAN(VQGANConfig(in_channels=1, out_channels=1, codebook_size=32, **base)),
        }
        tasks = ["layout", "edges", "depth", "superres4", "superres8", "free"]
        sizes = {"image": 64, "layout": 32, "edges": 32, "depth": 32}
        vocabulary = Vocabulary.build(sizes, tasks)
        gpt = GPT(
            GPTConfig(
                image_vocab=64,
                cond_vocab=vocabulary.size,
                n_layer=2,
                n_head=2,
                n_embd=32,
                window_rows=4,
                window_cols=6,
            )
        )
        return cls("tiny-untrained", image_model, stages, gpt, vocabulary, palette, "tiny")

    # ------------------------------------------------------------------ previews

    @torch.no_grad()
    def _patch_table(self) -> np.ndarray:
        """Each code decoded alone as one f×f patch: K × f × f × 3 uint8 (for previews)."""
        size = self.image_model.config.codebook_size
        codes = torch.arange(size).view(size, 1, 1)
        patches = []
        for chunk in codes.split(256):
            patches.append(to_uint8(self.image_model.decode_indices(chunk)))
        return np.concatenate(patches)

    def preview(self, tokens: np.ndarray) -> np.ndarray:
        """A mosaic of per-code patches for a token grid h × w (-1 = not yet: grey)."""
        f = self.factor
        h, w = tokens.shape
        mosaic = self._patches[np.clip(tokens, 0, None)]  # h, w, f, f, 3
        mosaic = np.where((tokens < 0)[..., None, None, None], np.uint8(90), mosaic)
        return mosaic.transpose(0, 2, 1, 3, 4).reshape(h * f, w * f, 3)

    # ------------------------------------------------------------------ conditions

    def _check_request(self, request: GenerateRequest) -> None:
        if request.mode not in self.modes:
            raise InputError(
                f"this model cannot do '{request.mode}'; it offers {', '.join(self.modes)}"
            )
        if request.mode == "superres":
            return
        low, high = self.factor, self.max_side
        for label, value in (("width", request.width), ("height", request.height)):
            if not low <= value <= high:
                raise InputError(
                    f"the {label} must be between {low} and {high} pixels; got {value}"
                )
        if not 1 <= request.num_samples <= 8:
            raise InputError("the number of samples must be between 1 and 8")

    def output_size(self, request: GenerateRequest) -> tuple[int, int]:
        """(width, height) of the output; superres multiplies the small photo's size."""
        if request.mode != "superres":
            return request.width, request.height
        small = np.asarray(request.condition)
        width = small.shape[1] * request.superres_factor
        height = small.shape[0] * request.superres_factor
        if max(width, height) > self.max_side or min(width, height) < self.factor:
            raise InputError(
                f"×{request.superres_factor} of a {small.shape[1]}×{small.shape[0]} photo is "
                f"{width}×{height}; the output must be {self.factor}–{self.max_side} px a side"
            )
        return width, height

    def condition_map(self, request: GenerateRequest, width: int, height: int):
        """The request's condition as a map of the output size (None for free mode)."""
        mode, condition = request.mode, request.condition
        if mode == "free":
            return None
        if condition is None:
            raise InputError(f"the {mode} mode needs a condition: paint or upload one first")
        condition = np.asarray(condition)
        try:
            if mode == "layout":
                check_layout(condition, self.palette)
                return _resize_nearest(condition.astype(np.int64), width, height)
            if mode == "sketch":
                edges = sketch_to_edges(condition) if condition.ndim == 3 else condition
                if not (edges > 0).any():
                    raise InputError("the sketch is empty: draw some lines first")
                edges = np.where(edges > 0, np.uint8(255), np.uint8(0))
                return resize_edges(edges, width, height)
            if mode == "depth":
                depth = depth_from_array(condition.astype(np.float32))
                if not depth.any():  # a constant map: nothing near or far to follow
                    raise InputError(
                        "the depth map is one flat value, so it says nothing about near and far: "
                        "give one with near (bright) and far (dark) parts"
                    )
                return upsample_bicubic(depth, (width, height)).clip(0, 1)
            if condition.ndim != 3 or condition.dtype != np.uint8:
                raise InputError("superres needs a small RGB photo")
            return upsample_bicubic(condition[..., :3], (width, height))
        except (LayoutError, ConditionError) as error:
            raise InputError(str(error)) from None

    @torch.no_grad()
    def condition_tokens(self, request: GenerateRequest, cond_map, grid) -> Condition:
        """Prefix and condition tokens [B, 1], [B, h, w] for a condition map of the padded size."""
        batch = request.num_samples
        task = self._task_for(request.mode, request.superres_factor)
        if task not in self.vocabulary.tasks():
            raise InputError(f"this model was not trained for {task}")
        scene = request.scene if request.mode == "free" else None
        if scene is not None and scene not in self.scenes:
            raise InputError(f"unknown scene '{scene}'; choose one of {', '.join(self.scenes)}")
        prefix = torch.full((batch, 1), self.vocabulary.prefix_for(task, scene))
        if cond_map is None:
            if request.guidance != 1 and self.guided(request):  # a scene, steered from any scene
                return Condition(prefix, unguided_prefix=torch.full_like(prefix, self.any_scene))
            return Condition(prefix)
        padded = _pad_to(cond_map, grid.padded_height, grid.padded_width)
        if task in SUPERRES_TASKS:
            model, inputs, source = self.image_model, to_tensor([padded]), "image"
        else:
            model = self.stages[task]
            inputs, source = condition_input(task, padded[None], self.palette), task
        tile = 512 if max(padded.shape[:2]) > 1024 else None
        offset = self.vocabulary.offsets[source]
        codes = model.encode_indices(inputs, tile=tile) + offset
        unguided = None
        if request.guidance != 1 and self.guided(request):
            empty = self._empty_condition(task, padded.shape[:2])
            unguided = model.encode_indices(empty, tile=tile) + offset
            unguided = unguided.expand(batch, -1, -1).contiguous()
        return Condition(prefix, codes.expand(batch, -1, -1).contiguous(), unguided)

    @property
    def any_scene(self) -> int:
        """The prefix id of free generation with no scene class."""
        return self.vocabulary.prefix_for("free", None)

    def guided(self, request: GenerateRequest) -> bool:
        """Whether guidance applies: layouts and sketches (from the empty condition), and free
        generation of a scene class (from any scene)."""
        if request.mode == "free":
            return request.scene is not None
        return self._task_for(request.mode, 4) in GUIDED_TASKS

    def _empty_condition(self, task: str, shape: tuple[int, int]) -> torch.Tensor:
        """Stage input of an unpainted layout or a blank sketch: what guidance steers from."""
        if task == "layout":
            return condition_input(task, np.full((1, *shape), self.palette.free_id), self.palette)
        return condition_input(task, np.zeros((1, *shape), dtype=np.uint8), self.palette)

    # ------------------------------------------------------------------ sampling

    def _window(self, request: GenerateRequest) -> tuple[int, int]:
        rows, cols = self.transformer.config.window_rows, self.transformer.config.window_cols
        if request.window is None:
            return rows, cols
        if not 2 <= request.window <= rows:
            raise InputError(f"the window must be 2 to {rows} token rows; got {request.window}")
        return request.window, max(2, round(cols * request.window / rows))

    def settings(self, request: GenerateRequest, width: int, height: int) -> dict:
        values = {k: v for k, v in vars(request).items() if k != "condition"}
        values.update(width=width, height=height, model=self.name, model_id=self.identity)
        values["prior"] = self.prior_in_use(request)
        return values

    def prior_in_use(self, request: GenerateRequest) -> float:
        """The class prior a request gets: its own in layout mode with a bundle that has the
        counts, else 0 (what callers record, so saved settings say what was used)."""
        return request.prior if request.mode == "layout" and self.layout_prior is not None else 0.0

    def generate(
        self, request: GenerateRequest, stop: threading.Event | None = None
    ) -> Iterator[Preview | Result]:
        """Stream previews (at least one per token row), then a Result with the final images."""
        plan = self.compose_plan(request) if request.compose else None
        if plan is not None:  # both checks happen now, as in a direct run
            self._check_request(request)
            small = replace(request, width=plan[0], height=plan[1], compose=False)
            return self._composed(request, plan, self._sample(small, None, None, stop), stop)
        return self._sample(request, None, None, stop)

    def compose_plan(self, request: GenerateRequest) -> tuple[int, int, int] | None:
        """(small width, small height, enlargement) when composing request's size; None when the
        picture is sampled directly (low enough already, superres mode, or no superres task)."""
        low, high = COMPOSE_HEIGHTS
        above = COMPOSE_ABOVE_FREE if request.mode == "free" else COMPOSE_ABOVE
        if request.mode == "superres" or request.height <= above:
            return None
        f, tasks = self.factor, self.vocabulary.tasks()
        for enlarge in (4, 8):
            if f"superres{enlarge}" not in tasks:
                continue
            small_h = max(low, -(-request.height // (enlarge * f)) * f)
            if small_h > high:
                continue
            small_w = round(request.width * small_h / (request.height * f)) * f  # aspect kept
            small_w = max(f, min(small_w, self.max_side // (enlarge * f) * f))
            return small_w, small_h, enlarge
        return None

    def _composed(self, request, plan, first_pass, stop) -> Iterator[Preview | Result]:
        """Sample a small picture, enlarge each with superres, scale to the size (compose=True).

        Previews of both passes come at the requested size; counts cover both passes. The
        result's tokens are the final image's own, so it can be resampled and extended.
        """
        small_w, small_h, enlarge = plan
        width, height = request.width, request.height
        started = time.monotonic()
        f, batch = self.factor, request.num_samples
        small_rows, big_rows = small_h // f, small_h * enlarge // f
        small_tokens = small_rows * (small_w // f)
        big_tokens = big_rows * (small_w * enlarge // f)
        rows_total = small_rows + batch * big_rows
        tokens_total = small_tokens + batch * big_tokens

        def shown(images, done_rows, done_tokens, eta, stage):
            return Preview(
                [_fit(image, width, height) for image in images],
                done_rows,
                rows_total,
                done_tokens,
                tokens_total,
                time.monotonic() - started,
                eta,
                stage,
            )

        composing = f"composing {small_w}×{small_h}"

        first = None
        for event in first_pass:
            if isinstance(event, Result):
                first = event
                break
            rate = event.elapsed / max(event.tokens_done, 1)  # guided: about twice enlarging's
            eta = event.eta + rate * batch * big_tokens / 2
            yield shown(event.images, event.rows_done, event.tokens_done, eta, composing)
        frames = [_fit(frame, width, height) for frame in first.frames]
        finals = [None] * batch
        stopped = first.stopped
        for index, small in enumerate(first.images):
            if stopped:
                break
            enlarge_request = GenerateRequest(
                mode="superres",
                condition=small,
                superres_factor=enlarge,
                seed=request.seed + index,
                temperature=request.temperature,
                top_k=request.top_k,
                top_p=request.top_p,
                window=request.window,
            )
            done_rows = small_rows + index * big_rows
            done_tokens = small_tokens + index * big_tokens
            for event in self._sample(enlarge_request, None, None, stop):
                if isinstance(event, Result):
                    finals[index], stopped = event.images[0], event.stopped
                    if index == 0:
                        frames += [_fit(frame, width, height) for frame in event.frames]
                    break
                later = (batch - index - 1) * big_tokens * event.elapsed / max(event.tokens_done, 1)
                yield shown(
                    event.images,
                    done_rows + event.rows_done,
                    done_tokens + event.tokens_done,
                    event.eta + later,
                    f"enlarging ×{enlarge}" + (f", sample {index + 1}" if batch > 1 else ""),
                )
        images = [
            _fit(final if final is not None else small, width, height, smooth=True)
            for final, small in zip(finals, first.images, strict=True)
        ]
        # the picture is ready; its tokens (for resampling and extending) take a few seconds more
        yield Preview(
            images,
            rows_total,
            rows_total,
            tokens_total,
            tokens_total,
            time.monotonic() - started,
            0.0,
            "finishing: the final picture's tokens",
        )
        yield Result(
            images,
            self.encode(images),
            frames,
            self.settings(request, width, height),
            stopped,
            time.monotonic() - started,
            {"composed": first.images, "compose_plan": plan},
        )

    @torch.no_grad()
    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        """The image VQGAN's tokens of same-sized images (padded by the padding rule): B × h × w."""
        height, width = images[0].shape[:2]
        grid = grid_for_pixels(width, height, self.factor)
        padded = [_pad_to(image, grid.padded_height, grid.padded_width) for image in images]
        tile = 512 if max(grid.padded_height, grid.padded_width) > 1024 else None
        return self.image_model.encode_indices(to_tensor(padded), tile=tile).cpu().numpy()

    def resample(
        self,
        request: GenerateRequest,
        tokens: np.ndarray,
        mask: np.ndarray,
        stop: threading.Event | None = None,
    ) -> Iterator[Preview | Result]:
        """Resample the tokens under a pixel mask (H × W bool); the rest never changes.

        Tokens are visited in raster order, so only kept tokens above and to the left of a
        masked token inform it: a mask's lower right part follows what is kept there less.
        The noise is drawn from seed + 1: with the original's own seed and context, the same
        tokens would come back.
        """
        mask = np.asarray(mask, dtype=bool)
        tokens = np.asarray(tokens)
        grid = grid_for_pixels(request.width, request.height, self.factor)
        if mask.shape != (request.height, request.width):
            raise InputError(
                f"the mask is {mask.shape[1]}×{mask.shape[0]}, the image "
                f"{request.width}×{request.height}; paint the mask on the result itself"
            )
        if not mask.any():
            raise InputError("the mask is empty: paint over the part to redo")
        if tokens.shape[-2:] != (grid.grid_h, grid.grid_w):
            raise InputError(
                f"the tokens ({tokens.shape[-1]}×{tokens.shape[-2]}) are not those of a "
                f"{request.width}×{request.height} image; resample a result of this size"
            )
        padded = _pad_to(mask, grid.padded_height, grid.padded_width)
        f = self.factor
        token_mask = padded.reshape(grid.grid_h, f, grid.grid_w, f).any(axis=(1, 3))
        request = replace(request, seed=request.seed + 1)
        return self._sample(request, tokens, token_mask, stop)

    def extend(
        self,
        request: GenerateRequest,
        tokens: np.ndarray,
        right: int,
        down: int,
        stop: threading.Event | None = None,
    ) -> Iterator[Preview | Result]:
        """Grow the canvas by `right` / `down` pixels; only the added area is sampled.

        The request keeps the old size; the new area's condition is free (layout), blank
        (sketch) or the nearest edge (depth).
        """
        if request.mode == "superres":
            raise InputError("a superres result cannot be extended; extend the small photo")
        grown = self.grown(request, right, down)
        f = self.factor
        tokens = np.asarray(tokens)
        old_h, old_w = tokens.shape[-2:]
        grid = grid_for_pixels(grown.width, grown.height, f)
        known = np.full((tokens.shape[0], grid.grid_h, grid.grid_w), -1, dtype=np.int64)
        known[:, :old_h, :old_w] = tokens
        mask = np.ones((grid.grid_h, grid.grid_w), dtype=bool)
        mask[: request.height // f, : request.width // f] = False
        return self._sample(grown, known, mask, stop)

    def grown(self, request: GenerateRequest, right: int, down: int) -> GenerateRequest:
        """The request of a picture extended by `right` / `down` pixels, rounded up to whole
        tokens: the new size, and the condition map grown as `extend` grows it."""
        if right < 0 or down < 0 or right + down == 0:
            raise InputError("extend by a positive number of pixels to the right or down")
        f = self.factor
        width = request.width + -(-right // f) * f
        height = request.height + -(-down // f) * f
        if request.condition is not None and request.mode != "free":
            request = _extended_condition(request, width, height, self.palette)
        return replace(request, width=width, height=height)

    def _sample(self, request, known, token_mask, stop) -> Iterator[Preview | Result]:
        self._check_request(request)
        width, height = self.output_size(request)
        grid = grid_for_pixels(width, height, self.factor)
        cond_map = self.condition_map(request, grid.width, grid.height)
        condition = self.condition_tokens(request, cond_map, grid)
        guided = self.guided(request)
        bias = {}
        if request.mode == "layout" and request.prior > 0 and self.layout_prior is not None:
            bias = {
                "bias_table": request.prior * self.layout_prior,
                "bias_index": torch.as_tensor(
                    cell_majority(
                        _pad_to(cond_map, grid.padded_height, grid.padded_width),
                        self.factor,
                        0.0,  # each cell leans toward whichever class covers most of it
                        self.palette,
                    )
                ),
            }
        try:
            options = SamplingOptions(
                temperature=request.temperature,
                top_k=request.top_k or None,
                top_p=request.top_p or None,
                seed=request.seed,
                guidance=request.guidance if guided else 1.0,
                **bias,
            )
        except ValueError as error:
            raise InputError(str(error)) from None
        known_t = mask_t = None
        if known is not None:
            known_t = torch.as_tensor(np.asarray(known), dtype=torch.long)
            if known_t.shape[0] != request.num_samples:
                known_t = known_t[:1].expand(request.num_samples, -1, -1).contiguous()
            mask_t = torch.as_tensor(token_mask)[None]
        return self._stream(request, condition, grid, options, known_t, mask_t, stop, width, height)

    def _stream(self, request, condition, grid, options, known, mask, stop, width, height):
        started = time.monotonic()
        window = self._window(request)
        events = sample(
            self.transformer,
            condition,
            grid.grid_h,
            grid.grid_w,
            options,
            window=window,
            known=known,
            mask=mask,
        )
        frames, last_rows, tokens, stopped = [], -1, None, False
        every = max(1, grid.grid_w // 2)
        for event in events:
            tokens = event.tokens
            if stop is not None and stop.is_set():
                stopped = True
                break
            row_changed = event.rows_done != last_rows
            done = event.tokens_done == event.tokens_total
            if row_changed or event.tokens_done % every == 0 or done:
                images = [self.preview(t)[:height, :width] for t in tokens.cpu().numpy()]
                if row_changed:
                    frames.append(images[0])
                    last_rows = event.rows_done
                yield Preview(
                    images,
                    event.rows_done,
                    grid.grid_h,
                    event.tokens_done,
                    event.tokens_total,
                    event.elapsed,
                    event.eta,
                )
        if tokens is None:  # nothing to sample (an empty mask): the known grid as it is
            tokens = known
        final = tokens.clone()
        images = self.decode(final, width, height)
        extra = {}
        if request.mode == "superres" and not stopped:
            # the decoder alone drifts from the photo's colours; back-projection restores them
            small = np.asarray(request.condition)[..., :3]
            factor = request.superres_factor
            extra["decoded"] = images  # before back-projection, for measuring what it adds
            images = [back_project(image, small, factor) for image in images]
        frames.append(images[0])
        yield Result(
            images,
            final.cpu().numpy(),
            frames,
            self.settings(request, width, height),
            stopped,
            time.monotonic() - started,
            extra,
        )

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, width: int, height: int) -> list[np.ndarray]:
        """Full decode of B × h × w tokens, cropped to the size.

        Unsampled tokens (a stopped run) are shown grey, and rows below the last sampled one
        are not decoded at all, so stopping stays quick.
        """
        f = self.factor
        unknown = tokens < 0
        sampled_rows = (~unknown).any(dim=0).any(dim=1).nonzero()
        rows = int(sampled_rows.max()) + 1 if len(sampled_rows) else 0
        images = np.full((tokens.shape[0], tokens.shape[1] * f, tokens.shape[2] * f, 3), 90)
        images = images.astype(np.uint8)
        if rows:
            part = tokens[:, :rows].clamp(min=0)
            images[:, : rows * f] = to_uint8(self.image_model.decode_indices(part, DECODE_TILE))
        if unknown.any():
            grey = unknown.repeat_interleave(f, 1).repeat_interleave(f, 2).cpu().numpy()
            images = np.where(grey[..., None], np.uint8(90), images)
        return [image[:height, :width] for image in images]

    def estimate_depth(self, layout_ids: np.ndarray) -> np.ndarray:
        """A depth map (near = bright, [0, 1]) guessed from a painted layout."""
        try:
            return estimate_depth_from_layout(np.asarray(layout_ids), self.palette)
        except ConditionError as error:
            raise InputError(str(error)) from None


def _fit(image: np.ndarray, width: int, height: int, smooth: bool = False) -> np.ndarray:
    """An RGB picture at width × height: Lanczos when smooth, else nearest (cheap previews)."""
    if image.shape[:2] == (height, width):
        return image
    resample = Image.Resampling.LANCZOS if smooth else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def _resize_nearest(array: np.ndarray, width: int, height: int) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array
    rows = (np.arange(height) * array.shape[0] / height).astype(np.int64)
    cols = (np.arange(width) * array.shape[1] / width).astype(np.int64)
    return array[rows][:, cols]


def _extended_condition(request, width, height, palette: Palette) -> GenerateRequest:
    """The request with its condition map grown to width × height (see Pipeline.extend)."""
    condition = np.asarray(request.condition)
    old_h, old_w = condition.shape[:2]
    scale_h, scale_w = old_h / request.height, old_w / request.width
    new_h, new_w = round(height * scale_h), round(width * scale_w)
    if request.mode == "layout":
        grown = np.full((new_h, new_w), palette.free_id, dtype=condition.dtype)
        grown[:old_h, :old_w] = condition
    elif request.mode == "sketch":
        grown = np.zeros((new_h, new_w, *condition.shape[2:]), dtype=condition.dtype)
        if condition.ndim == 3:
            grown[...] = 255  # blank paper
        grown[:old_h, :old_w] = condition
    else:
        grown = _pad_to(condition, new_h, new_w)
    return replace(request, condition=grown)
