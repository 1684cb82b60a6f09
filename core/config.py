"""Typed configuration: dataclasses filled from YAML files and `key=value` overrides.

Every model and training run is described by a dataclass. `load_config` merges a YAML file and
command-line overrides into it with OmegaConf and turns any mismatch into a `ConfigError` whose
one-line message names the offending key and the file it came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

__all__ = ["MISSING", "ConfigError", "load_config", "config_to_yaml", "config_from_dict"]


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or missing."""


def _describe(error: OmegaConfBaseException, source: str) -> str:
    key = getattr(error, "full_key", None) or getattr(error, "key", None) or "?"
    message = str(error).splitlines()[0]
    return f"config key '{key}' in {source}: {message}"


def _section_given_a_value(schema: Any, layer: Any, prefix: str = "") -> str | None:
    """The dotted key where `layer` puts a plain value or a list in place of a section."""
    for key in layer.keys():
        if key not in schema.keys():
            continue
        expected, given = schema._get_node(key), layer._get_node(key)
        if not OmegaConf.is_dict(expected):
            continue
        if not OmegaConf.is_dict(given):
            return f"{prefix}{key}"
        inner = _section_given_a_value(expected, given, f"{prefix}{key}.")
        if inner:
            return inner
    return None


def _merge(schema: Any, layer: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(schema, layer)
    except OmegaConfBaseException as error:
        message = _describe(error, source)
        if getattr(error, "key", None) is None:  # OmegaConf does not say where a section broke
            section = _section_given_a_value(schema, layer)
            if section:
                message = f"config key '{section}' in {source}: expected a section of keys"
        raise ConfigError(message) from None


def _parse_overrides(overrides: Sequence[str]) -> Any:
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}' must look like key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error, "command line")) from None


def _check_complete(merged: Any, source: str) -> None:
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' in {source}: a value is required")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a `cls` instance from an optional YAML file plus `key=value` overrides."""
    merged = OmegaConf.structured(cls)
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layer = OmegaConf.load(path)
        except Exception as error:  # YAML syntax errors come from several libraries
            detail = " ".join(str(error).split())  # parsers report over several lines
            raise ConfigError(f"config file {path} is not valid YAML: {detail}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"config file {path} must hold keys and values, not a list")
        merged = _merge(merged, layer, str(path))
        source = str(path)
    if overrides:
        merged = _merge(merged, _parse_overrides(overrides), "command line")
    _check_complete(merged, source if not overrides else f"{source} + command line")
    return OmegaConf.to_object(merged)


def config_from_dict(cls: type[T], values: dict, source: str) -> T:
    """Validate a plain dict (read from a checkpoint) against `cls`."""
    merged = _merge(OmegaConf.structured(cls), OmegaConf.create(values), source)
    _check_complete(merged, source)
    return OmegaConf.to_object(merged)


def config_to_yaml(config: Any) -> str:
    """The full config as YAML text, defaults included."""
    if not dataclasses.is_dataclass(config):
        raise TypeError("config_to_yaml expects a dataclass instance")
    return OmegaConf.to_yaml(OmegaConf.structured(config))
