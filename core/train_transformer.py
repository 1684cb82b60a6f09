"""Stage-2 training: one transformer for every task, over token grids cached on disk.

Photos are tokenised once with the frozen stages (the image VQGAN, the layout / edges / depth
stages, and the image VQGAN again on bicubically upsampled ×4 / ×8 thumbnails for superres),
then the model trains on random windows of those grids, one task per batch, with a prefix
token naming the task (or the scene class for free generation). The cache is keyed by the
stages' weight hashes, so changing a stage re-tokenises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from core.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    tokens_sha256,
)
from core.condition_stages import condition_input
from core.conditions import canny_edges, downsample, estimate_depth_from_layout, upsample_bicubic
from core.config import ConfigError, config_to_yaml
from core.data import DataError, Record, load_rgb, step_generator, to_tensor
from core.models import (
    SCENES,
    SPATIAL_TASKS,
    SUPERRES_TASKS,
    TASKS,
    Vocabulary,
    load_stage,
    load_vqgan,
)
from core.palette import Palette, load_label_map, random_free_regions
from core.training import (
    DataConfig,
    Run,
    RunConfig,
    average_gradients,
    broadcast_module_,
    cosine_lr,
)
from core.transformer import GPT, GPTConfig

logger = logging.getLogger(__name__)


@dataclass
class StagePaths:
    image: str = "runs/vqgan/checkpoint"
    layout: str | None = "runs/layout/checkpoint"
    edges: str | None = "runs/edges/checkpoint"
    depth: str | None = "runs/depth/checkpoint"


@dataclass
class TransformerTrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    stages: StagePaths = field(default_factory=StagePaths)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    task_weights: list[float] = field(default_factory=list)  # empty: equal weights
    token_height: int = 160  # photos are resized to this height (px) before tokenising
    max_aspect: float = 2.0  # wider photos are centre-cropped to this width / height
    superres_share: float = 0.5  # share of photos also tokenised as ×4 / ×8 thumbnails
    mirror: bool = True  # also tokenise each training photo mirrored left-right (twice the data)
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 200
    val_every: int = 500
    val_windows: int = 64  # windows per task in the validation NLL
    cache: str = "runs/token_cache"
    # A transformer checkpoint to start from (same layers and width): its blocks and image
    # tables are copied, and so are the condition rows of every stage whose tokens are unchanged
    # and every prefix token by name; the rest starts fresh. Empty: train from scratch.
    init: str = ""


# ----------------------------------------------------------------------------- tokenising


@dataclass
class TokenGrids:
    """Token grids of one photo at one size: image codes and each condition's codes."""

    image: np.ndarray  # h, w int16
    conditions: dict[str, np.ndarray]  # task -> h, w int16 (cond-vocab ids, offsets applied)
    scene: str | None


class Tokeniser:
    """The frozen stages, turning a photo (and its label map) into token grids."""

    def __init__(self, stages: StagePaths, tasks: list[str], palette: Palette):
        self.palette = palette
        self.image_model, image_hash = load_vqgan(stages.image, "image")
        self.factor = self.image_model.factor
        self.stage_models, self.hashes = {}, {"image": image_hash}
        for task in SPATIAL_TASKS:
            folder = getattr(stages, task)
            if task in tasks and folder:
                model, sha = load_stage(folder, task)
                if model.factor != self.factor:
                    raise ConfigError(
                        f"config key 'stages.{task}': its f = {model.factor} differs from the "
                        f"image VQGAN's f = {self.factor}; the token grids must align"
                    )
                self.stage_models[task], self.hashes[task] = model, sha
        missing = [t for t in tasks if t in SPATIAL_TASKS and t not in self.stage_models]
        if missing:
            raise ConfigError(f"config key 'stages.{missing[0]}' is empty but task is requested")
        sizes = {"image": self.image_model.config.codebook_size}
        sizes.update({k: m.config.codebook_size for k, m in self.stage_models.items()})
        self.vocabulary = Vocabulary.build(sizes, tasks)
        self.tasks = tasks

    def cache_key(self, config: TransformerTrainConfig, split: str) -> str:
        text = json.dumps(
            [self.hashes, self.tasks, config.token_height, config.max_aspect, split,
             config.superres_share, config.data.min_nature_share, config.data.folder,
             config.mirror and split == "train"],
            sort_keys=True,
        )  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _resized(self, array: np.ndarray, height: int, max_aspect: float, resample) -> np.ndarray:
        """Resize to `height`, then centre-crop to whole tokens and at most max_aspect wide."""
        f = self.factor
        h, w = array.shape[:2]
        width = round(w * height / h)
        resized = np.asarray(Image.fromarray(array).resize((width, height), resample))
        keep = min(width, int(height * max_aspect)) // f * f
        left = (width - keep) // 2
        return resized[: height // f * f, left : left + keep]

    @torch.no_grad()
    def _encode(self, model, inputs: torch.Tensor) -> np.ndarray:
        """Indices B, h, w as int16; a batch of same-sized inputs at once."""
        return model.encode_indices(inputs).cpu().numpy().astype(np.int16)

    def prepare(
        self,
        record: Record,
        config: TransformerTrainConfig,
        rng: np.random.Generator,
        mirror: bool = False,
    ) -> dict | None:
        """The photo at token height and its condition maps, ready to encode (None: too small).

        `mirror` flips the photo (and its label map) left-right before the maps are derived.
        """
        image = load_rgb(record.photo)
        if image.shape[0] < config.token_height:
            return None
        original_shape = image.shape[:2]
        fit = (config.token_height, config.max_aspect)
        image = self._resized(image, *fit, Image.LANCZOS)
        if mirror:
            image = np.ascontiguousarray(image[:, ::-1])
        h, w = image.shape[:2]
        ids = None
        if record.label is not None and {"layout", "depth"} & set(self.stage_models):
            full = load_label_map(record.label, self.palette).astype(np.uint8)
            if full.shape != original_shape:  # label maps are read at the photo's size
                size = (original_shape[1], original_shape[0])
                full = np.asarray(Image.fromarray(full).resize(size, Image.NEAREST))
            ids = self._resized(full, *fit, Image.NEAREST)
            if mirror:
                ids = np.ascontiguousarray(ids[:, ::-1])
        maps = {"edges": canny_edges(image, rng)}
        if ids is not None:
            maps["layout"] = random_free_regions(ids, rng, self.palette)
            maps["depth"] = estimate_depth_from_layout(ids, self.palette, rng)
        maps = {task: m for task, m in maps.items() if task in self.stage_models}
        if rng.random() < config.superres_share:
            for task in SUPERRES_TASKS:
                if task in self.tasks:
                    small = downsample(image, int(task.removeprefix("superres")))
                    maps[task] = upsample_bicubic(small, (w, h))
        return {"image": image, "maps": maps, "scene": record.scene}

    @torch.no_grad()
    def encode(self, prepared: list[dict]) -> list[TokenGrids]:
        """Token grids of prepared photos that share one size, encoded in batches."""
        vocabulary = self.vocabulary
        codes = self._encode(self.image_model, to_tensor([p["image"] for p in prepared]))
        grids = [TokenGrids(c, {}, p["scene"]) for c, p in zip(codes, prepared, strict=True)]
        for task in (*SPATIAL_TASKS, *SUPERRES_TASKS):
            members = [k for k, p in enumerate(prepared) if task in p["maps"]]
            if not members:
                continue
            stacked = [prepared[k]["maps"][task] for k in members]
            if task in SUPERRES_TASKS:
                model, inputs, source = self.image_model, to_tensor(stacked), "image"
            else:
                model, source = self.stage_models[task], task
                inputs = condition_input(task, np.stack(stacked), self.palette)
            task_codes = self._encode(model, inputs) + vocabulary.offsets[source]
            for k, grid_codes in zip(members, task_codes, strict=True):
                grids[k].conditions[task] = grid_codes.astype(np.int16)
        return grids


def _encode_by_size(tokeniser: Tokeniser, prepared: list[dict], batch: int) -> list[TokenGrids]:
    """Encode prepared photos in batches of equal size, keeping their order."""
    grids: list[TokenGrids | None] = [None] * len(prepared)
    by_size: dict[tuple, list[int]] = {}
    for index, item in enumerate(prepared):
        by_size.setdefault(item["image"].shape, []).append(index)
    bar = tqdm(total=len(prepared), desc="encoding", unit="photo")
    for members in by_size.values():
        for start in range(0, len(members), batch):
            chunk = members[start : start + batch]
            encoded = tokeniser.encode([prepared[i] for i in chunk])
            for index, grid in zip(chunk, encoded, strict=True):
                grids[index] = grid
            bar.update(len(chunk))
    bar.close()
    return [g for g in grids if g is not None]


def tokenise_split(
    tokeniser: Tokeniser, records: list[Record], config: TransformerTrainConfig, split: str
) -> list[TokenGrids]:
    """Token grids of every usable photo, from the cache when the stages are unchanged."""
    key = tokeniser.cache_key(config, split)
    path = Path(config.cache) / f"{split}-{key}.pt"
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        logger.info("token cache %s: %d photos", path, len(stored))
        return [
            TokenGrids(
                item["image"].numpy(),
                {k: v.numpy() for k, v in item["conditions"].items()},
                item["scene"] or None,
            )
            for item in stored
        ]
    rng = np.random.default_rng([config.run.seed, 7])
    prepared = []
    mirrors = (False, True) if config.mirror and split == "train" else (False,)
    for record in tqdm(records, desc=f"preparing {split}", unit="photo"):
        for mirror in mirrors:
            try:
                item = tokeniser.prepare(record, config, rng, mirror)
            except DataError as error:
                logger.warning("skipping %s", error)
                break
            if item is not None:
                prepared.append(item)
    grids = _encode_by_size(tokeniser, prepared, batch=16)
    if not grids:
        raise DataError(f"no photo of the {split} split is {config.token_height} px tall or more")
    stored = [
        {
            "image": torch.from_numpy(g.image),
            "conditions": {k: torch.from_numpy(v) for k, v in g.conditions.items()},
            "scene": g.scene or "",
        }
        for g in grids
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")  # DDP ranks tokenise side by side
    torch.save(stored, temporary)
    temporary.replace(path)
    return grids


# ----------------------------------------------------------------------------- windows


class WindowBatches:
    """Random windows of cached token grids, one task per batch, deterministic per step."""

    def __init__(self, grids, vocabulary: Vocabulary, window, tasks, weights, seed, rank=0):
        self.grids = grids
        self.vocabulary = vocabulary
        self.rows, self.cols = window
        self.seed, self.rank = seed, rank
        self.by_task = {}
        for task in tasks:
            usable = [
                i
                for i, g in enumerate(grids)
                if g.image.shape[0] >= self.rows
                and g.image.shape[1] >= self.cols
                and (task == "free" or task in g.conditions)
            ]
            if usable:
                self.by_task[task] = usable
            else:
                logger.warning("task %s has no photo with its condition; not trained", task)
        self.tasks = list(self.by_task)
        weights = (
            [weights[tasks.index(t)] for t in self.tasks] if weights else [1.0] * len(self.tasks)
        )
        self.weights = np.array(weights, dtype=np.float64) / sum(weights)

    def batch(self, step: int, size: int, task: str | None = None):
        rng = step_generator(self.seed, self.rank, step)
        task = task or self.tasks[int(rng.choice(len(self.tasks), p=self.weights))]
        prefixes, conds, images = [], [], []
        for index in rng.choice(self.by_task[task], size):
            grid = self.grids[index]
            top = int(rng.integers(0, grid.image.shape[0] - self.rows + 1))
            left = int(rng.integers(0, grid.image.shape[1] - self.cols + 1))
            crop = (slice(top, top + self.rows), slice(left, left + self.cols))
            images.append(grid.image[crop].reshape(-1))
            scene = grid.scene if (grid.scene and rng.random() < 0.7) else None
            prefixes.append(self.vocabulary.prefix_for(task, scene))
            if task != "free":
                conds.append(grid.conditions[task][crop].reshape(-1))
        prefix = torch.tensor(prefixes, dtype=torch.long)[:, None]
        cond = torch.from_numpy(np.stack(conds).astype(np.int64)) if conds else None
        image = torch.from_numpy(np.stack(images).astype(np.int64))
        return task, prefix, cond, image


# ----------------------------------------------------------------------------- metrics


def unigram_bits(train_grids, val_batches, vocab: int) -> float:
    """Bits per token of val image tokens under the train tokens' unigram frequencies."""
    counts = np.ones(vocab)  # add-one smoothing
    for grid in train_grids:
        counts += np.bincount(grid.image.reshape(-1).astype(np.int64), minlength=vocab)
    log_p = np.log2(counts / counts.sum())
    total, n = 0.0, 0
    for _, _, _, image in val_batches:
        total -= float(log_p[image.numpy()].sum())
        n += image.numel()
    return total / n


@torch.no_grad()
def validation_bits(model: GPT, val_batches, window, run: Run) -> dict[str, float]:
    """Mean NLL in bits per image token, overall and per task."""
    model.eval()
    per_task: dict[str, list[float]] = {}
    for task, prefix, cond, image in val_batches:
        with run.autocast():
            loss = model.loss(
                prefix.to(run.device),
                None if cond is None else cond.to(run.device),
                image.to(run.device),
                *window,
            )
        per_task.setdefault(task, []).append(float(loss) / math.log(2))
    model.train()
    result = {f"val_bits_{task}": float(np.mean(v)) for task, v in per_task.items()}
    result["val_bits"] = float(np.mean([b for v in per_task.values() for b in v]))
    return result


def fixed_val_batches(batches: WindowBatches, count: int) -> list:
    """The same validation windows every time: count per task, in batches of 16."""
    fixed = []
    for task in batches.tasks:
        for k in range(max(1, count // 16)):
            fixed.append(batches.batch(10_000_000 + k, 16, task))
    return fixed


# ----------------------------------------------------------------------------- warm start


def _condition_rows(old: Vocabulary, new: Vocabulary, old_hashes: dict, new_hashes: dict):
    """Pairs (new ids, old ids) of condition-table rows that mean the same token in both."""
    new_ids, old_ids = [], []
    for source, offset in new.offsets.items():
        same_tokens = old_hashes.get(source) and old_hashes.get(source) == new_hashes.get(source)
        if source in old.offsets and same_tokens and old.sizes[source] == new.sizes[source]:
            new_ids += range(offset, offset + new.sizes[source])
            old_ids += range(old.offsets[source], old.offsets[source] + new.sizes[source])
    for name in new.prefixes:
        if name in old.prefixes:
            new_ids.append(new.prefix_id(name))
            old_ids.append(old.prefix_id(name))
    return new_ids, old_ids


CONDITION_TABLES = ("cond_embed.weight", "aligned_embed.weight")  # rows follow the vocabulary
IMAGE_TABLES = ("image_embed.weight", "head.weight")  # rows follow the image VQGAN's codebook


def _image_tokens(folder: Path, recorded: str | None) -> str | None:
    """The hash of the image tokens the transformer in `folder` learnt.

    A bundled transformer records its bundled image VQGAN's weights hash; after a decoder-only
    fine-tune that is not the tokens' hash, which the image folder keeps as `tokens_from`.
    """
    bundle = folder.parent
    if recorded and (bundle / MANIFEST_FILE).is_file():
        image = read_manifest(bundle).get("image")
        if image is not None and image["weights_sha256"] == recorded:
            return tokens_sha256(load_checkpoint(bundle / image["folder"]))
    return recorded


def warm_start(model: GPT, folder: str, vocabulary: Vocabulary, hashes: dict) -> list[str]:
    """Copy what still means the same from the transformer in `folder`; returns what started new.

    Every other tensor must have the same shape (the same layers, width and window); condition
    rows are copied only for stages whose token hash is unchanged, and the image embedding and
    head only when the image VQGAN's tokens are unchanged. An aligned condition table the old
    model lacks stays at zero, so the model starts computing what the old one did.
    """
    checkpoint = load_checkpoint(folder, kind="transformer")
    old_vocabulary = Vocabulary.from_dict(checkpoint.extra["vocabulary"])
    old_hashes = dict(checkpoint.extra.get("stages", {}))
    old_hashes["image"] = _image_tokens(Path(folder), old_hashes.get("image"))
    new_ids, old_ids = _condition_rows(old_vocabulary, vocabulary, old_hashes, hashes)
    old_heads = checkpoint.model.get("n_head")
    if old_heads != model.config.n_head:
        raise CheckpointError(
            f"config key 'init': {folder} has {old_heads} attention heads, this model "
            f"{model.config.n_head}; init needs the same layers, heads, width and window"
        )
    same_image = bool(old_hashes["image"]) and old_hashes["image"] == hashes.get("image")
    fresh = [source for source, offset in vocabulary.offsets.items() if offset not in new_ids]
    if not same_image:
        fresh.append("image_embed and head (another image VQGAN)")
    fresh += [name for name in vocabulary.prefixes if vocabulary.prefix_id(name) not in new_ids]
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            source = checkpoint.state.get(name)
            same_width = source is not None and source.shape[1:] == tensor.shape[1:]
            if name in CONDITION_TABLES and (source is None or same_width):
                if source is None:
                    fresh.append(name.removesuffix(".weight"))
                else:
                    tensor[new_ids] = source[old_ids].to(tensor.device, tensor.dtype)
                continue
            if name in IMAGE_TABLES and not same_image:
                continue  # other codebook entries: the fresh initialisation stays
            if source is None or source.shape != tensor.shape:
                raise CheckpointError(
                    f"config key 'init': {folder} has no tensor '{name}' of shape "
                    f"{tuple(tensor.shape)}; init needs the same layers, width and window"
                )
            tensor.copy_(source.to(tensor.dtype))
    logger.info(
        "started from %s (step %s); started fresh: %s",
        folder,
        checkpoint.extra.get("step"),
        ", ".join(fresh) or "nothing",
    )
    return fresh


# ----------------------------------------------------------------------------- the run


def transformer_card(config, steps, val, unigram, photos, vocabulary) -> str:
    lines = [
        "# Transformer (stage 2)",
        "",
        f"- GPT: {config.model.n_layer} layers, {config.model.n_embd} wide, "
        f"{config.model.n_head} heads; window {config.model.window_rows}×"
        f"{config.model.window_cols} tokens",
        f"- tasks: {', '.join(vocabulary.tasks())}",
        f"- trained {steps} steps, batch {config.run.batch_size}, on {photos} photos "
        f"tokenised at {config.token_height} px height",
        f"- validation NLL: {val.get('val_bits', float('nan')):.3f} bits per image token "
        f"(unigram baseline {unigram:.3f})",
    ]
    lines += [f"  - {k[9:]}: {v:.3f}" for k, v in sorted(val.items()) if k.startswith("val_bits_")]
    return "\n".join(lines) + "\n"


def train_transformer(config: TransformerTrainConfig, train_records, val_records, resume: bool):
    """Tokenise (or read the cache), then train; returns the checkpoint folder."""
    unknown = [t for t in config.tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"config key 'tasks' has '{unknown[0]}'; known tasks: {TASKS}")
    palette = Palette.default()
    tokeniser = Tokeniser(config.stages, config.tasks, palette)
    vocabulary = tokeniser.vocabulary
    # the second stage's sizes come from the first stage's checkpoints, never by hand
    config.model.image_vocab = tokeniser.image_model.config.codebook_size
    config.model.cond_vocab = vocabulary.size
    train_grids = tokenise_split(tokeniser, train_records, config, "train")
    val_grids = tokenise_split(tokeniser, val_records, config, "val")
    run = Run(config.run, "transformer", config_to_yaml(config))
    window = (config.model.window_rows, config.model.window_cols)
    batches = WindowBatches(
        train_grids, vocabulary, window, config.tasks, config.task_weights, config.run.seed,
        run.dist.rank,
    )  # fmt: skip
    val_source = WindowBatches(val_grids, vocabulary, window, config.tasks, [], 1)
    val_batches = fixed_val_batches(val_source, config.val_windows)
    unigram = unigram_bits(train_grids, val_batches, config.model.image_vocab)
    logger.info("unigram baseline: %.3f bits per token", unigram)

    model = GPT(config.model).to(run.device)
    optimizer = model.configure_optimizer(config.lr, config.weight_decay)
    step, val = 0, {}
    if resume and (state := run.load_state()) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        logger.info("resumed %s at step %d", run.folder, step)
    elif config.init:
        warm_start(model, config.init, vocabulary, tokeniser.hashes)
    broadcast_module_(model, run.dist)  # every rank starts from rank 0's weights

    def save() -> None:
        run.save_state(
            {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
        )
        if run.dist.is_main:
            extra = {
                "vocabulary": vocabulary.as_dict(),
                "stages": dict(tokeniser.hashes),
                "stage_folders": {k: v for k, v in vars(config.stages).items() if v},
                "factor": tokeniser.factor,
                "palette": {
                    "names": list(palette.names),
                    "colours": [list(c) for c in palette.colours],
                },
                "scenes": list(SCENES),
                "step": step,
                "val_bits": val.get("val_bits"),
                "unigram_bits": unigram,
            }
            card = transformer_card(config, step, val, unigram, len(train_grids), vocabulary)
            save_checkpoint(
                run.folder / "checkpoint",
                "transformer",
                config.model,
                model.state_dict(),
                card,
                extra,
            )

    bar = run.progress(step)
    started, started_step = time.monotonic(), step
    try:
        while step < config.run.steps:
            task, prefix, cond, image = batches.batch(step, config.run.batch_size)
            lr = cosine_lr(step, config.lr, config.warmup, config.run.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with run.autocast():
                loss = model.loss(
                    prefix.to(run.device),
                    None if cond is None else cond.to(run.device),
                    image.to(run.device),
                    *window,
                )
            optimizer.zero_grad(set_to_none=True)
            if run.check_finite(loss, step, "a learning rate too high"):
                loss.backward()
                average_gradients(model.parameters(), run.dist)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            step += 1
            bar.update(1)
            if step % config.run.log_every == 0:
                rate = (step - started_step) / max(time.monotonic() - started, 1e-9)
                started, started_step = time.monotonic(), step
                value = loss.item()  # float(loss) would warn: the loss still requires grad
                metrics = {"loss": value, "bits": value / math.log(2), "lr": lr}
                metrics.update(task=task, steps_per_s=rate)
                run.log(step, metrics)
                bar.set_postfix(bits=f"{metrics['bits']:.2f}")
            if step % config.val_every == 0 or step == config.run.steps:
                val = validation_bits(model, val_batches, window, run)
                run.log(step, {**val, "unigram_bits": unigram})
            if run.due_for_save():
                save()
            if run.out_of_time():
                break
        if not val:
            val = validation_bits(model, val_batches, window, run)
            run.log(step, {**val, "unigram_bits": unigram})
        save()
    finally:
        bar.close()
        run.close()
    return run.folder / "checkpoint"
