"""Checkpoint folders and bundles.

A checkpoint is a folder: `config.yaml` (kind, full model config, weight hash and provenance),
`weights.safetensors` and `card.md`. Writes are atomic (temporary folder, then rename); loads are
strict and name the tensor that does not match. A bundle is a folder of checkpoints plus
`bundle.yaml`, a manifest naming each model folder and the hash of its weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.md"
MANIFEST_FILE = "bundle.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete, tampered with or does not fit the model."""


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read back."""

    folder: Path
    kind: str
    model: dict  # the model config as plain values; validate with config_from_dict
    weights_sha256: str
    state: dict[str, torch.Tensor]
    extra: dict = field(default_factory=dict)  # provenance: stage hashes, steps, data


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plain(config: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def save_checkpoint(
    folder: str | Path,
    kind: str,
    config: Any,
    state: dict[str, torch.Tensor],
    card: str,
    extra: dict | None = None,
    half: bool = False,
) -> str:
    """Write a checkpoint folder atomically; returns the weights' sha256.

    `half=True` stores floating tensors as fp16 (they load back into the model's own dtype).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        tensors[name] = tensor
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE))
        sha = file_sha256(staging / WEIGHTS_FILE)
        document = {
            "kind": kind,
            "model": _plain(config),
            "weights_sha256": sha,
            "extra": extra or {},
        }
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(document, sort_keys=False))
        (staging / CARD_FILE).write_text(card)
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sha


def _replace_folder(staging: Path, folder: Path) -> None:
    """Swap `staging` into place of `folder` so readers never see a half-written one."""
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)


def read_checkpoint_config(folder: str | Path) -> dict:
    """The parsed `config.yaml` of a checkpoint folder, with clear errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; expected a checkpoint folder")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint: it has no {CONFIG_FILE}")
    try:
        document = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        raise CheckpointError(f"{config_path} is not valid YAML: {error}") from None
    if not isinstance(document, dict) or not {"kind", "model", "weights_sha256"} <= set(document):
        raise CheckpointError(
            f"{config_path} lacks 'kind', 'model' or 'weights_sha256'; it was not written by "
            "this project's save_checkpoint"
        )
    return document


def load_checkpoint(folder: str | Path, kind: str | None = None) -> Checkpoint:
    """Read a checkpoint folder, verifying the weight hash (and the kind, when given)."""
    folder = Path(folder)
    document = read_checkpoint_config(folder)
    if kind is not None and document["kind"] != kind:
        raise CheckpointError(f"{folder} holds a '{document['kind']}' model, expected '{kind}'")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint: {WEIGHTS_FILE} is missing")
    sha = file_sha256(weights)
    if sha != document["weights_sha256"]:
        raise CheckpointError(
            f"{weights} does not match the hash recorded in {CONFIG_FILE} "
            "(the file is truncated or was changed); re-copy or retrain the model"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights} cannot be read: {error}") from None
    extra = document.get("extra") or {}  # provenance is optional in hand-made folders
    return Checkpoint(folder, document["kind"], document["model"], sha, state, extra)


def tokens_sha256(checkpoint: Checkpoint) -> str:
    """The hash that names the tokens a stage checkpoint makes.

    Its own weights' hash, or, for a decoder-only fine-tune, the hash of the checkpoint whose
    encoder and codebook it kept unchanged (recorded in `extra` as `tokens_from`).
    """
    return checkpoint.extra.get("tokens_from") or checkpoint.weights_sha256


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module`; any missing, unexpected or mis-shaped tensor is an error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{source}: tensor '{missing[0]}' is missing ({len(missing)} in all)")
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor '{extra[0]}' ({len(extra)} in all)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(own[name].shape)}"
            )
    converted = {name: state[name].to(own[name].dtype) for name in own}
    module.load_state_dict(converted, strict=True)


# ---------------------------------------------------------------------------- bundles


def write_manifest(bundle: str | Path, models: dict[str, str]) -> Path:
    """Write `bundle.yaml` naming each role's folder (relative) and its weights' hash."""
    bundle = Path(bundle)
    entries = {}
    for role, folder in models.items():
        document = read_checkpoint_config(bundle / folder)
        entries[role] = {"folder": folder, "weights_sha256": document["weights_sha256"]}
    path = bundle / MANIFEST_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump({"models": entries}, sort_keys=True))
    os.replace(temporary, path)
    return path


def read_manifest(bundle: str | Path) -> dict[str, dict]:
    """Roles of a bundle, checked against the folders' recorded hashes."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{bundle} is not a model bundle: {MANIFEST_FILE} is missing "
            "(train one with train.py, or point --checkpoints at the bundled checkpoints/)"
        )
    try:
        document = yaml.safe_load(path.read_text())
        models = document["models"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a valid bundle manifest") from None
    for role, entry in models.items():
        recorded = read_checkpoint_config(bundle / entry["folder"])["weights_sha256"]
        if recorded != entry["weights_sha256"]:
            raise CheckpointError(
                f"{path}: model '{role}' in {entry['folder']} is not the one the bundle was "
                "built with (weights hash differs); rebuild the manifest or restore the folder"
            )
    return models
