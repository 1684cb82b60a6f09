"""Windowed sampling of image tokens with the stage-2 transformer, exact first, then fast.

For every position of an h x w token grid, in raster order, a window (at most the model's trained
size) is placed by a rule that depends on the position alone; the window's condition crop and its
image tokens before the position (in the window's raster order) give the next-token distribution.
`sample_naive` runs one full forward per token (the reference); `sample_cached` keeps a KV cache
per window placement, gets the same logits from cheap decode and extend steps, and runs the
targets of several rows in one model pass wherever their contexts are already final.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.transformer import GPT, CacheFeed, KVCache

logger = logging.getLogger(__name__)


MAX_GUIDANCE = 8.0  # the studio's slider, the CLI and restored PNG settings share this limit


def default_stride(window: tuple[int, int]) -> tuple[int, int]:
    """Half the window in each direction: (ceil(rows / 2), cols // 2), at least 1.

    Chosen by measurement (8x256 model, 10x16 window, 64x64 grid with a condition grid, one
    thread on a 2-core machine shared with other jobs; CPU seconds of the cached sampler):
    (1, 1) 186, (4, 4) 26.5, (3, 8) 23.3, (4, 8) 21.9, (5, 8) 20.2, (6, 8) 20.5, (5, 10) 20.8.
    Each window placement costs a prompt prefill of about 210 tokens, so small strides are slow;
    past (5, 8) the per-token decode passes dominate and larger strides stop paying, while they
    shrink the context a target is guaranteed inside its window (rows // 2 - stride_rows // 2
    rows above it). (5, 8) keeps 3 rows above and 4 columns either side of every target.
    """
    return max(1, (window[0] + 1) // 2), max(1, window[1] // 2)


LogitsHook = Callable[[tuple[int, int], torch.Tensor], None]


@dataclass
class SamplingOptions:
    temperature: float = 1.0  # applied after top-k / top-p, so it reshapes only the kept set
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False  # argmax; ignores temperature, top-k, top-p and the noise
    seed: int = 0
    # Classifier-free guidance: logits = unguided + guidance * (conditioned - unguided), where
    # the unguided logits come from `Condition.unguided` (an empty layout, a blank sketch).
    # 1 samples from the model as trained; larger values follow the condition more closely.
    guidance: float = 1.0
    # A per-position logit bias: bias_table[bias_index[i, j]] (a row of V) is added to the
    # logits at token (i, j), after guidance; -1 in bias_index adds nothing. Both or neither.
    bias_table: torch.Tensor | None = None  # n, V
    bias_index: torch.Tensor | None = None  # h, w long

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {self.temperature}; use greedy=True for argmax"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p}")
        if (self.bias_table is None) != (self.bias_index is None):
            raise ValueError("bias_table and bias_index go together: give both or neither")
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            raise ValueError(
                f"guidance must be between 0 and {MAX_GUIDANCE:g} (1 = none), got {self.guidance}"
            )


@dataclass
class Condition:
    """What the model is conditioned on: prefix ids [B, 1] and an optional grid [B, h, w].

    Both hold cond-vocab ids. The grid has the image grid's size, so a window crops both with one
    slice; it is None for class-conditional and unconditional models. `unguided` [B, h, w] is
    the grid that guidance steers away from (see `SamplingOptions.guidance`); it runs beside
    `tokens` in the same model passes, so guidance costs about twice the work.
    """

    prefix: torch.Tensor
    tokens: torch.Tensor | None = None
    unguided: torch.Tensor | None = None
    # prefix ids [B, 1] of the unguided rows when guidance steers from another prefix (a scene
    # class away from "any scene"); None: the unguided rows keep `prefix`
    unguided_prefix: torch.Tensor | None = None


@dataclass
class SampleEvent:
    """Progress after one token. `tokens` is the live grid [B, h, w] (-1 = not yet sampled).

    The grid is shared with the sampler and changes after the event: clone it to keep a copy.
    The last event carries the finished grid (the generator also returns it). The cached sampler
    works on several rows at once, so positions do not come in raster order; `rows_done` only
    grows.
    """

    position: tuple[int, int]
    tokens: torch.Tensor
    tokens_done: int
    tokens_total: int
    rows_done: int  # rows above this index are final
    elapsed: float  # seconds since sampling started
    eta: float  # seconds still expected, from the mean time per token so far


@dataclass
class PixelGrid:
    """A pixel size rounded up to whole tokens: sample grid_h x grid_w, crop to width x height."""

    grid_h: int
    grid_w: int
    padded_width: int
    padded_height: int
    width: int
    height: int


def grid_for_pixels(width: int, height: int, factor: int = 16) -> PixelGrid:
    """Token grid for an image of width x height pixels at downsampling `factor` (rounded up)."""
    if width < factor or height < factor:
        raise ValueError(
            f"{width}x{height} pixels is smaller than one token; the minimum is "
            f"{factor}x{factor} pixels at f={factor}"
        )
    grid_w, grid_h = math.ceil(width / factor), math.ceil(height / factor)
    return PixelGrid(grid_h, grid_w, grid_w * factor, grid_h * factor, width, height)


# ---------------------------------------------------------------------------- picking tokens


def filter_logits(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """Top-k, then top-p, then temperature: logits [B, V] with -inf outside the kept set."""
    if options.top_k is not None and options.top_k < logits.shape[-1]:
        kept = logits.topk(options.top_k, dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, kept, True)
        logits = logits.masked_fill(~keep, -math.inf)
    if options.top_p is not None and options.top_p < 1:
        probs = F.softmax(logits.double(), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        mass_before[..., 0] = 0.0
        keep_sorted = mass_before < options.top_p  # smallest set reaching p; never empty
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        logits = logits.masked_fill(~keep, -math.inf)
    return logits / options.temperature


def pick_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions
) -> torch.Tensor:
    """Tokens [B] from logits [B, V] and pre-drawn uniforms [B] in [0, 1) by inverse CDF.

    The CDF runs over the vocabulary in index order, so equal logits and equal noise give the
    same token whichever sampler produced the logits.
    """
    if options.greedy:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits, options).double(), dim=-1)  # B, V
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf) * cdf[:, -1]  # B
    picked = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    last_kept = (probs > 0).cumsum(dim=-1).argmax(dim=-1)  # guards rounding at the top end
    return torch.minimum(picked, last_kept)


def draw_noise(batch: int, grid_h: int, grid_w: int, seed: int) -> torch.Tensor:
    """Uniforms [B, h, w] (float64), one per sample and position, from a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, grid_h, grid_w, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------------- placement


def _place(index: int, size: int, window: int, stride: int) -> int:
    anchor = stride * (index // stride)
    return min(max(anchor + stride // 2 - window // 2, 0), size - window)


def window_placement(
    i: int, j: int, grid_h: int, grid_w: int, window: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int]:
    """Top-left (top, left) of the window that serves target (i, j); window fits the grid.

    With stride (1, 1) the target sits at row window_rows // 2, column window_cols // 2 of its
    window, pinned at the borders (the paper's placement); with larger strides one window serves
    a stride_rows x stride_cols block of targets around its centre.
    """
    return _place(i, grid_h, window[0], stride[0]), _place(j, grid_w, window[1], stride[1])


def _fit_window(
    model: GPT,
    grid_h: int,
    grid_w: int,
    window: tuple[int, int] | None,
    stride: tuple[int, int] | None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window shrunk to the grid, and the stride shrunk to that window."""
    limit = (model.config.window_rows, model.config.window_cols)
    rows, cols = limit if window is None else window
    if not (1 <= rows <= limit[0] and 1 <= cols <= limit[1]):
        raise ValueError(
            f"window {rows}x{cols} tokens is larger than this model's trained window "
            f"{limit[0]}x{limit[1]} (rows x cols); pass a window of at most that size"
        )
    stride_rows, stride_cols = default_stride((rows, cols)) if stride is None else stride
    if not (1 <= stride_rows <= rows and 1 <= stride_cols <= cols):
        raise ValueError(
            f"stride {stride_rows}x{stride_cols} must be at least 1 and at most the window "
            f"{rows}x{cols}, or targets would fall outside their window"
        )
    rows, cols = min(rows, grid_h), min(cols, grid_w)
    return (rows, cols), (min(stride_rows, rows), min(stride_cols, cols))


# ---------------------------------------------------------------------------- cached windows


@dataclass
class _WindowState:
    cache: KVCache
    cond: torch.Tensor | None  # B, r*c condition crop
    tokens: torch.Tensor  # B, r*c image tokens fed to the cache (first cache.image_length valid)


class WindowCaches:
    """KV caches of the windows in use for one condition and window size, keyed by placement.

    A cache holds a prefix of its window crop's raster sequence. Asked for the token after
    `before`, it cuts back to the first image token that differs from what it holds and feeds the
    tokens added since (or the whole prompt, for a window it has not seen).
    """

    def __init__(self, model: GPT, condition: Condition, window: tuple[int, int]):
        self.model = model
        self.prefix = condition.prefix
        self.cond_grid = condition.tokens
        self.window = window
        self.states: dict[tuple[int, int], _WindowState] = {}
        self.counts = {"prefill": 0, "prefill_tokens": 0, "extend": 0, "extend_tokens": 0}
        self.counts |= {"decode": 0, "cut_back": 0, "passes": 0}

    def _open(self, top: int, left: int, device: torch.device) -> _WindowState:
        rows, cols = self.window
        batch = self.prefix.shape[0]
        cond = None
        if self.cond_grid is not None:
            cond = self.cond_grid[:, top : top + rows, left : left + cols].reshape(batch, -1)
        cache = self.model.new_cache(batch, rows, cols, cond is not None)
        tokens = torch.full((batch, rows * cols), -1, dtype=torch.long, device=device)
        state = _WindowState(cache, cond, tokens)
        self.states[(top, left)] = state
        return state

    def _prompt(self, state: _WindowState, before: torch.Tensor) -> CacheFeed:
        rows, cols = self.window
        feed = self.model.feed_prompt(state.cache, self.prefix, state.cond, before, rows, cols)
        state.tokens[:, : before.shape[1]] = before
        self.counts["prefill"] += 1
        self.counts["prefill_tokens"] += feed.x.shape[1]
        return feed

    def feed(self, top: int, left: int, before: torch.Tensor) -> CacheFeed:
        """What window (top, left) must run to give the logits after `before` [B, t]."""
        state = self.states.get((top, left))
        if state is None:
            return self._prompt(self._open(top, left, before.device), before)
        t, held = before.shape[1], state.cache.image_length
        common = min(held, t)
        same = common
        if not torch.equal(state.tokens[:, :common], before[:, :common]):
            differs = (state.tokens[:, :common] != before[:, :common]).any(dim=0)
            same = int(differs.int().argmax())  # first image token that changed
        keep = min(same, t - 1)  # feed at least one token to get fresh logits
        if keep < held:
            self.counts["cut_back"] += 1
        if keep < 0:  # the target is the window's first token: only the prompt is wanted
            return self._prompt(state, before)
        self.model.truncate(state.cache, keep)
        added = before[:, keep:]
        state.tokens[:, keep:t] = added
        if t - keep == 1:
            self.counts["decode"] += 1
        else:
            self.counts["extend"] += 1
            self.counts["extend_tokens"] += t - keep
        return self.model.feed_image(state.cache, added, keep)

    def logits(self, top: int, left: int, before: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the image token after `before` [B, t] in window (top, left)."""
        return self.run([self.feed(top, left, before)])[0]

    def run(self, feeds: list[CacheFeed]) -> list[torch.Tensor]:
        """Run the feeds of several windows in one pass; logits [B, V] for each."""
        self.counts["passes"] += 1
        return self.model.run_feeds(feeds)

    def drop_above(self, top: int) -> None:
        """Forget windows whose top row is above `top`: raster order never returns to them."""
        for key in [key for key in self.states if key[0] < top]:
            del self.states[key]


# ---------------------------------------------------------------------------- the loop


@dataclass
class _Plan:
    tokens: torch.Tensor  # B, h, w; known tokens kept, positions to sample = -1
    sample_mask: torch.Tensor  # B, h, w bool
    positions: list[tuple[int, int]]  # union of the mask, raster order
    noise: torch.Tensor  # B, h, w uniforms
    window: tuple[int, int]
    stride: tuple[int, int]
    condition: Condition  # what the model runs on, on its device: 2B rows when guided
    guidance: float | None = None  # None: unguided, the model's logits are used as they are


def _prepare(
    model: GPT,
    condition: Condition,
    grid_h: int,
    grid_w: int,
    options: SamplingOptions,
    window: tuple[int, int] | None,
    stride: tuple[int, int] | None,
    known: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> _Plan:
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() before sampling")
    device = model.head.weight.device
    prefix = condition.prefix
    if prefix.dim() != 2 or prefix.shape[1] != 1:
        raise ValueError(f"condition prefix must have shape [B, 1], got {tuple(prefix.shape)}")
    batch = prefix.shape[0]
    if condition.tokens is not None and tuple(condition.tokens.shape) != (batch, grid_h, grid_w):
        raise ValueError(
            f"condition grid has shape {tuple(condition.tokens.shape)}, expected "
            f"{(batch, grid_h, grid_w)} (batch, grid_h, grid_w)"
        )
    if condition.tokens is not None:
        _check_ids(condition.tokens, model.config.cond_vocab, "condition grid", "cond_vocab")
    _check_ids(prefix, model.config.cond_vocab, "condition prefix", "cond_vocab")
    window, stride = _fit_window(model, grid_h, grid_w, window, stride)
    tokens, sample_mask = _initial_tokens(batch, grid_h, grid_w, known, mask, device)
    _check_ids(tokens[tokens >= 0], model.config.image_vocab, "known tokens", "image_vocab")
    union = sample_mask.any(dim=0)
    positions = [tuple(p) for p in union.nonzero().tolist()]
    if not positions:
        raise ValueError("the mask selects no position to sample; nothing to do")
    noise = draw_noise(batch, grid_h, grid_w, options.seed).to(device)
    on_device = _model_condition(condition, options, model.config.cond_vocab, device)
    guidance = None if options.guidance == 1 else options.guidance
    return _Plan(tokens, sample_mask, positions, noise, window, stride, on_device, guidance)


def _model_condition(
    condition: Condition, options: SamplingOptions, vocab: int, device: torch.device
) -> Condition:
    """The condition the model runs on: with guidance, the conditioned rows then the unguided."""
    prefix = condition.prefix.to(device)
    cond_grid = None if condition.tokens is None else condition.tokens.to(device)
    if options.guidance == 1:
        return Condition(prefix, cond_grid)
    unguided_prefix = condition.unguided_prefix
    if unguided_prefix is not None:
        if tuple(unguided_prefix.shape) != tuple(prefix.shape):
            raise ValueError(
                f"unguided prefix has shape {tuple(unguided_prefix.shape)}, the prefix "
                f"{tuple(prefix.shape)}; they must match"
            )
        _check_ids(unguided_prefix, vocab, "unguided prefix", "cond_vocab")
        unguided_prefix = unguided_prefix.to(device)
        if cond_grid is None:  # class-conditional: only the prefix differs
            return Condition(torch.cat([prefix, unguided_prefix]))
    unguided = condition.unguided
    if cond_grid is None or unguided is None:
        raise ValueError(
            "guidance needs an unguided counterpart: a condition grid with Condition.unguided, "
            "or Condition.unguided_prefix; use guidance=1 for this condition"
        )
    if tuple(unguided.shape) != tuple(cond_grid.shape):
        raise ValueError(
            f"unguided grid has shape {tuple(unguided.shape)}, the condition grid "
            f"{tuple(cond_grid.shape)}; they must match"
        )
    _check_ids(unguided, vocab, "unguided grid", "cond_vocab")
    both = torch.cat([cond_grid, unguided.to(device)])  # 2B, h, w
    second = prefix if unguided_prefix is None else unguided_prefix
    return Condition(torch.cat([prefix, second]), both)


def _guide(logits: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """Logits [B, V] from the model's [B, V] (unguided) or [2B, V] (conditioned, unguided)."""
    if guidance is None:
        return logits
    conditioned, unguided = logits.chunk(2)
    return unguided + guidance * (conditioned - unguided)


def _check_ids(ids: torch.Tensor, vocab: int, what: str, key: str) -> None:
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
        raise ValueError(
            f"{what}: ids run from {int(ids.min())} to {int(ids.max())}, but the model's "
            f"{key} allows 0..{vocab - 1}"
        )


def _initial_tokens(
    batch: int,
    grid_h: int,
    grid_w: int,
    known: torch.Tensor | None,
    mask: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting grid [B, h, w] (-1 where sampled) and the mask [B, h, w] of positions to sample."""
    shape = (batch, grid_h, grid_w)
    if known is None:
        if mask is not None:
            raise ValueError("a mask needs `known` tokens for the positions it leaves alone")
        return torch.full(shape, -1, dtype=torch.long, device=device), torch.ones(
            shape, dtype=torch.bool, device=device
        )
    known = known.to(device=device, dtype=torch.long)
    if known.shape[1:] != shape[1:] or known.shape[0] not in (1, batch):
        raise ValueError(f"known tokens have shape {tuple(known.shape)}, expected {shape}")
    known = known.expand(shape)
    if mask is None:
        mask = known < 0  # sample what is not known
    mask = mask.to(device=device, dtype=torch.bool)
    if mask.shape[1:] != shape[1:] or mask.shape[0] not in (1, batch):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected [B or 1, h, w] = {shape}")
    mask = mask.expand(shape).clone()
    if bool((known[~mask] < 0).any()):
        raise ValueError("known tokens outside the mask must be codebook indices (>= 0)")
    return torch.where(mask, torch.full_like(known, -1), known), mask


WindowLogits = Callable[[int, int, torch.Tensor], torch.Tensor]


class _Progress:
    """Counts tokens and times them for the events."""

    def __init__(self, plan: _Plan):
        self.total = len(plan.positions)
        self.done = 0
        self.started = time.perf_counter()

    def event(self, position: tuple[int, int], tokens: torch.Tensor, rows_done: int) -> SampleEvent:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        return SampleEvent(position, tokens, self.done, self.total, rows_done, elapsed, eta)

    def log(self, work: dict[str, int] | None = None) -> None:
        elapsed = time.perf_counter() - self.started
        rate = self.total / max(elapsed, 1e-9)
        logger.debug("sampled %d tokens in %.2f s (%.1f tokens/s)", self.total, elapsed, rate)
        if work is not None:
            logger.debug("window caches: %s", work)


def _write(plan: _Plan, i: int, j: int, picked: torch.Tensor) -> None:
    """Store picked [B] at (i, j) for the samples whose mask selects it."""
    column = plan.tokens[:, i, j]
    plan.tokens[:, i, j] = torch.where(plan.sample_mask[:, i, j], picked, column)


def _before(plan: _Plan, i: int, j: int, top: int, left: int) -> torch.Tensor:
    """Image tokens [B, t] of window (top, left) before target (i, j), in the window's raster."""
    rows, cols = plan.window
    batch = plan.tokens.shape[0]
    crop = plan.tokens[:, top : top + rows, left : left + cols].reshape(batch, rows * cols)
    before = crop[:, : (i - top) * cols + (j - left)]
    return before if plan.guidance is None else torch.cat([before, before])  # both halves


def _biased(
    logits: torch.Tensor, options: SamplingOptions, positions: list[tuple[int, int]]
) -> torch.Tensor:
    """logits [N*B, V] of N positions (B samples each) plus their rows of the bias table."""
    if options.bias_table is None:
        return logits
    rows_i, cols_j = zip(*positions, strict=True)
    rows = options.bias_index[list(rows_i), list(cols_j)]  # N
    bias = options.bias_table[rows.clamp(min=0)] * (rows >= 0).unsqueeze(1)  # -1: nothing
    return logits + bias.to(logits).repeat_interleave(logits.shape[0] // len(positions), dim=0)


def _run_raster(
    plan: _Plan,
    options: SamplingOptions,
    window_logits: WindowLogits,
    on_logits: LogitsHook | None,
) -> Generator[SampleEvent, None, torch.Tensor]:
    """Sample plan.positions one at a time in raster order; `window_logits` gives the logits."""
    grid_h, grid_w = plan.tokens.shape[1:]
    progress = _Progress(plan)
    for index, (i, j) in enumerate(plan.positions):
        top, left = window_placement(i, j, grid_h, grid_w, plan.window, plan.stride)
        logits = _guide(window_logits(top, left, _before(plan, i, j, top, left)), plan.guidance)
        logits = _biased(logits, options, [(i, j)])
        if on_logits is not None:
            on_logits((i, j), logits)
        _write(plan, i, j, pick_tokens(logits, plan.noise[:, i, j], options))
        following = index + 1
        rows_done = plan.positions[following][0] if following < progress.total else grid_h
        yield progress.event((i, j), plan.tokens, rows_done)
    progress.log()
    return plan.tokens


class _Wavefront:
    """Which targets may be sampled now: those whose window context is final.

    Target (i, j) in window (top, left) reads rows top..i-1 of the window in full and row i up
    to column j - 1. Once those are final its logits are the same whatever else is pending, so
    several rows advance together, each trailing the one above by about a window width, and the
    tokens equal those of plain raster order.
    """

    def __init__(self, plan: _Plan):
        self.plan = plan
        grid_h, grid_w = plan.tokens.shape[1:]
        self.pending: dict[int, list[int]] = {}  # row -> columns still to sample, reversed
        for i, j in plan.positions:
            self.pending.setdefault(i, []).insert(0, j)
        self.final_upto = [grid_w] * grid_h  # columns 0..final_upto[r]-1 of row r are final
        self.next: dict[int, tuple[int, int, int]] = {}  # row -> (j, top, left) of its next target
        for i in self.pending:
            self._queue_next(i)

    def _queue_next(self, i: int) -> None:
        plan = self.plan
        j = self.pending[i][-1]
        top, left = window_placement(i, j, *plan.tokens.shape[1:], plan.window, plan.stride)
        self.final_upto[i] = j
        self.next[i] = (j, top, left)

    def ready(self) -> list[tuple[int, int, int, int]]:
        """(i, j, top, left) of every target that can be sampled now (never empty)."""
        final_upto, cols = self.final_upto, self.plan.window[1]
        found = []
        for i, (j, top, left) in self.next.items():
            right = left + cols
            if all(final_upto[row] >= right for row in range(i - 1, top - 1, -1)):
                found.append((i, j, top, left))
        return found

    def first_row(self) -> int:
        return min(self.pending)

    def advance(self, i: int) -> None:
        """Mark the next target of row i as sampled."""
        columns = self.pending[i]
        columns.pop()
        if columns:
            self._queue_next(i)
        else:
            self.final_upto[i] = self.plan.tokens.shape[2]
            del self.pending[i], self.next[i]

    def rows_done(self) -> int:
        return min(self.pending) if self.pending else self.plan.tokens.shape[1]


def _run_wavefront(
    plan: _Plan,
    options: SamplingOptions,
    caches: WindowCaches,
    on_logits: LogitsHook | None,
) -> Generator[SampleEvent, None, torch.Tensor]:
    """Sample every ready target of several windows per model pass, until none is left."""
    grid_h, grid_w = plan.tokens.shape[1:]
    batch = plan.tokens.shape[0]
    wavefront = _Wavefront(plan)
    progress = _Progress(plan)
    while wavefront.pending:
        first = wavefront.first_row()
        caches.drop_above(_place(first, grid_h, plan.window[0], plan.stride[0]))
        targets = wavefront.ready()
        with torch.inference_mode():
            feeds = [
                caches.feed(top, left, _before(plan, i, j, top, left))
                for i, j, top, left in targets
            ]
            logits = torch.cat([_guide(part, plan.guidance) for part in caches.run(feeds)])
            logits = _biased(logits, options, [(i, j) for i, j, _, _ in targets])
            noise = torch.cat([plan.noise[:, i, j] for i, j, _, _ in targets])  # N*B
            picked = pick_tokens(logits, noise, options).view(len(targets), batch)
        for n, (i, j, _, _) in enumerate(targets):
            if on_logits is not None:
                on_logits((i, j), logits[n * batch : (n + 1) * batch])
            _write(plan, i, j, picked[n])
            wavefront.advance(i)
            yield progress.event((i, j), plan.tokens, wavefront.rows_done())
    progress.log(caches.counts)
    return plan.tokens


def sample_naive(
    model: GPT,
    condition: Condition,
    grid_h: int,
    grid_w: int,
    options: SamplingOptions,
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    on_logits: LogitsHook | None = None,
) -> Generator[SampleEvent, None, torch.Tensor]:
    """Reference sampler: one full forward of [prefix, cond crop, image crop] per token."""
    plan = _prepare(model, condition, grid_h, grid_w, options, window, stride, known, mask)
    rows, cols = plan.window
    prefix, cond_grid = plan.condition.prefix, plan.condition.tokens
    batch = prefix.shape[0]  # 2B when guided

    def window_logits(top: int, left: int, before: torch.Tensor) -> torch.Tensor:
        cond = None
        if cond_grid is not None:
            cond = cond_grid[:, top : top + rows, left : left + cols].reshape(batch, -1)
        return model.next_token_logits(prefix, cond, before, rows, cols)

    return _run_raster(plan, options, window_logits, on_logits)


def sample_cached(
    model: GPT,
    condition: Condition,
    grid_h: int,
    grid_w: int,
    options: SamplingOptions,
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    on_logits: LogitsHook | None = None,
    work: dict[str, int] | None = None,
) -> Generator[SampleEvent, None, torch.Tensor]:
    """Same tokens as `sample_naive`, from one KV cache per window placement.

    Each model pass serves every target whose window context is already final (see
    `_Wavefront`): on a 64-wide grid about four rows advance together, each a window width
    behind the one above, so the weights are read once for several tokens. The order differs
    from raster order; the tokens do not.
    `work`, when given, is filled with counts of prefill, extend and decode steps as they happen.
    """
    plan = _prepare(model, condition, grid_h, grid_w, options, window, stride, known, mask)
    caches = WindowCaches(model, plan.condition, plan.window)
    if work is not None:
        work.update(caches.counts)
        caches.counts = work
    return _run_wavefront(plan, options, caches, on_logits)


def sample(
    model: GPT,
    condition: Condition,
    grid_h: int,
    grid_w: int,
    options: SamplingOptions,
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    method: str = "cached",
    on_logits: LogitsHook | None = None,
) -> Generator[SampleEvent, None, torch.Tensor]:
    """Sample an h x w token grid; a generator of `SampleEvent`s, returning the final grid.

    window: (rows, cols), at most the model's trained window (default: that window); it shrinks
    to the grid where the grid is smaller. stride: how far windows move (see `window_placement`);
    default `default_stride(window)`, half the window.
    known [B or 1, h, w] and mask [B or 1, h, w] (True = sample) resample a region or extend a
    canvas: tokens outside the mask never change. Tokens are sampled as in raster order (the
    cached sampler reorders work, not results) and a window feeds only the tokens before the
    target, so kept tokens *before* a position inform it and kept tokens after it do not.
    Without a mask, positions where `known` is -1 are sampled.
    method: "cached" (KV caches, fast) or "naive" (full forward per token, the reference).
    on_logits(position, logits [B, V]) sees the logits each token is drawn from (after guidance
    and the options' bias; for tests and tools).
    """
    samplers = {"cached": sample_cached, "naive": sample_naive}
    if method not in samplers:
        raise ValueError(f"method must be one of {sorted(samplers)}, got {method!r}")
    return samplers[method](
        model, condition, grid_h, grid_w, options, window, stride, known, mask, on_logits
    )
