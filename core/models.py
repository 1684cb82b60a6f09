"""Loading trained models, and the condition vocabulary that ties the stages to a transformer.

All condition kinds share the transformer's condition-token table: each spatial stage's codes
get an offset, low-resolution photos (encoded by the image VQGAN) get the image codes after
them, and the prefix tokens (one per task, and one per scene class for free generation) come
last. The vocabulary is derived from the stage checkpoints and stored with the transformer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from core.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_state_strict,
    tokens_sha256,
)
from core.config import ConfigError, config_from_dict
from core.layout_cells import KIND as CELLS_KIND
from core.layout_cells import CellsConfig, LayoutCells
from core.transformer import GPT, GPTConfig
from core.vqgan import VQGAN, VQGANConfig

logger = logging.getLogger(__name__)

SPATIAL_TASKS = ("layout", "edges", "depth")
SUPERRES_TASKS = ("superres4", "superres8")
TASKS = (*SPATIAL_TASKS, *SUPERRES_TASKS, "free")
SCENES = ("field", "forest", "lake", "mountain", "ocean", "road")


def vqgan_from_checkpoint(checkpoint: Checkpoint) -> VQGAN:
    """A VQGAN in eval mode built from a loaded checkpoint (strict: every tensor must fit)."""
    source = str(checkpoint.folder)
    if not checkpoint.kind.startswith("vqgan:"):
        raise CheckpointError(f"{source} holds a '{checkpoint.kind}' model, not a VQGAN stage")
    try:
        config = config_from_dict(VQGANConfig, checkpoint.model, f"{source}/config.yaml")
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    model = VQGAN(config)
    load_state_strict(model, checkpoint.state, source)
    return model.eval()


def load_vqgan(folder: str | Path, kind: str | None = None) -> tuple[VQGAN, str]:
    """A VQGAN (image or condition stage) from its folder, in eval mode; and its token hash.

    The token hash (`tokens_sha256`) names the tokens it makes: a decoder-only fine-tune shares
    it with the model it was tuned from.
    """
    checkpoint = load_checkpoint(folder, f"vqgan:{kind}" if kind else None)
    return vqgan_from_checkpoint(checkpoint), tokens_sha256(checkpoint)


def stage_from_checkpoint(checkpoint: Checkpoint) -> VQGAN | LayoutCells:
    """A condition stage in eval mode: a VQGAN, or the untrained layout cells."""
    if checkpoint.kind != CELLS_KIND:
        return vqgan_from_checkpoint(checkpoint)
    source = str(checkpoint.folder)
    try:
        config = config_from_dict(CellsConfig, checkpoint.model, f"{source}/config.yaml")
        model = LayoutCells(config)
    except (ConfigError, ValueError) as error:
        raise CheckpointError(f"{source}: {error}") from None
    load_state_strict(model, checkpoint.state, source)
    return model.eval()


def load_stage(folder: str | Path, role: str) -> tuple[VQGAN | LayoutCells, str]:
    """The condition stage for `role` (layout, edges, depth) from its folder; its token hash.

    A layout may be a trained VQGAN (`vqgan:layout`) or the cell grid (`cells:layout`).
    """
    checkpoint = load_checkpoint(folder)
    allowed = [f"vqgan:{role}"] + ([CELLS_KIND] if role == "layout" else [])
    if checkpoint.kind not in allowed:
        raise CheckpointError(
            f"{folder} holds a '{checkpoint.kind}' model; a {role} stage must be "
            f"{' or '.join(allowed)}"
        )
    return stage_from_checkpoint(checkpoint), tokens_sha256(checkpoint)


@dataclass
class Vocabulary:
    """Offsets of every condition source in the transformer's condition-token table."""

    offsets: dict[str, int] = field(default_factory=dict)  # source -> first id
    sizes: dict[str, int] = field(default_factory=dict)
    prefixes: list[str] = field(default_factory=list)  # names of prefix tokens, in order
    prefix_offset: int = 0

    @classmethod
    def build(cls, codebook_sizes: dict[str, int], tasks: list[str]) -> Vocabulary:
        """codebook_sizes: 'image' and each spatial stage present -> its codebook size."""
        vocabulary = cls()
        offset = 0
        sources = [k for k in SPATIAL_TASKS if k in codebook_sizes and k in tasks]
        if any(task in SUPERRES_TASKS for task in tasks):
            sources.append("image")
        for source in sources:
            vocabulary.offsets[source] = offset
            vocabulary.sizes[source] = codebook_sizes[source]
            offset += codebook_sizes[source]
        vocabulary.prefix_offset = offset
        vocabulary.prefixes = [f"task:{t}" for t in tasks if t != "free"]
        if "free" in tasks:
            vocabulary.prefixes += ["free:any"] + [f"free:{scene}" for scene in SCENES]
        return vocabulary

    @property
    def size(self) -> int:
        return self.prefix_offset + len(self.prefixes)

    def prefix_id(self, name: str) -> int:
        if name not in self.prefixes:
            raise ValueError(f"this model has no '{name}' token; it knows {self.prefixes}")
        return self.prefix_offset + self.prefixes.index(name)

    def source_of(self, task: str) -> str | None:
        """Which token source a task's condition grid comes from (None: prefix only)."""
        if task in SPATIAL_TASKS:
            return task
        if task in SUPERRES_TASKS:
            return "image"
        return None

    def prefix_for(self, task: str, scene: str | None = None) -> int:
        if task == "free":
            return self.prefix_id(f"free:{scene or 'any'}")
        return self.prefix_id(f"task:{task}")

    def tasks(self) -> list[str]:
        names = [p.split(":", 1)[1] for p in self.prefixes if p.startswith("task:")]
        return names + (["free"] if "free:any" in self.prefixes else [])

    def as_dict(self) -> dict:
        return {
            "offsets": dict(self.offsets),
            "sizes": dict(self.sizes),
            "prefixes": list(self.prefixes),
            "prefix_offset": self.prefix_offset,
        }

    @classmethod
    def from_dict(cls, values: dict) -> Vocabulary:
        return cls(
            offsets=dict(values["offsets"]),
            sizes=dict(values["sizes"]),
            prefixes=list(values["prefixes"]),
            prefix_offset=int(values["prefix_offset"]),
        )


@dataclass
class TransformerBundle:
    """A transformer with what it needs to be used: vocabulary, window and stage hashes."""

    model: GPT
    vocabulary: Vocabulary
    stage_hashes: dict[str, str]
    extra: dict
    weights_sha256: str


def load_transformer(folder: str | Path) -> TransformerBundle:
    checkpoint = load_checkpoint(folder, kind="transformer")
    try:
        config = config_from_dict(GPTConfig, checkpoint.model, f"{folder}/config.yaml")
        vocabulary = Vocabulary.from_dict(checkpoint.extra["vocabulary"])
        stage_hashes = dict(checkpoint.extra["stages"])
    except (ConfigError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder}/config.yaml is incomplete: {error}") from None
    model = GPT(config)
    load_state_strict(model, checkpoint.state, str(folder))
    model.eval()
    return TransformerBundle(
        model, vocabulary, stage_hashes, checkpoint.extra, checkpoint.weights_sha256
    )
