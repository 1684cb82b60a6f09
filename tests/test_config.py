"""`load_config`: YAML plus `key=value` overrides into a typed dataclass, with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.config import MISSING, ConfigError, load_config
from core.vqgan import VQGANConfig


@dataclass
class RunSettings:
    name: str = "run"
    steps: int = 100


@dataclass
class Settings:
    model: VQGANConfig = field(default_factory=VQGANConfig)
    run: RunSettings = field(default_factory=RunSettings)


@dataclass
class NeedsName:
    name: str = MISSING
    steps: int = 100


def write_yaml(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_misspelt_key_is_named_with_its_file(tmp_path):
    path = write_yaml(tmp_path, "misspelt.yaml", "run:\n  stpes: 5\n")

    with pytest.raises(ConfigError) as raised:
        load_config(Settings, path)

    message = str(raised.value)
    assert "run.stpes" in message
    assert "misspelt.yaml" in message
    assert "\n" not in message


def test_string_for_an_integer_names_the_key(tmp_path):
    path = write_yaml(tmp_path, "typed.yaml", "run:\n  steps: many\n")

    with pytest.raises(ConfigError, match=r"run\.steps"):
        load_config(Settings, path)


def test_required_value_left_missing_names_the_key(tmp_path):
    path = write_yaml(tmp_path, "partial.yaml", "steps: 4\n")

    with pytest.raises(ConfigError, match=r"'name'.*a value is required"):
        load_config(NeedsName, path)


def test_required_value_given_on_the_command_line_completes_the_config():
    config = load_config(NeedsName, None, ["name=valley"])

    assert config.name == "valley"


def test_file_values_replace_defaults(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", "run:\n  name: meadow\n  steps: 7\n")

    config = load_config(Settings, path)

    assert config.run.name == "meadow"
    assert config.run.steps == 7
    assert config.model.codebook_size == 1024  # untouched default


def test_override_beats_the_file(tmp_path):
    path = write_yaml(tmp_path, "run.yaml", "run:\n  steps: 7\n")

    config = load_config(Settings, path, ["run.steps=9"])

    assert config.run.steps == 9


def test_nested_override_reaches_the_model():
    config = load_config(Settings, None, ["model.codebook_size=512"])

    assert config.model.codebook_size == 512
    assert isinstance(config.model, VQGANConfig)


def test_override_value_is_converted_to_the_field_type():
    config = load_config(Settings, None, ["model.channel_mult=[1,2,4]", "model.beta=0.5"])

    assert config.model.channel_mult == [1, 2, 4]
    assert config.model.beta == 0.5


def test_override_of_unknown_key_is_refused():
    with pytest.raises(ConfigError, match=r"model\.codebok_size.*command line"):
        load_config(Settings, None, ["model.codebok_size=512"])


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match=r"override 'run\.steps' must look like key=value"):
        load_config(Settings, None, ["run.steps"])


def test_override_of_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"run\.steps.*command line"):
        load_config(Settings, None, ["run.steps=notanumber"])


def test_missing_config_file_is_refused(tmp_path):
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError, match=r"absent\.yaml does not exist"):
        load_config(Settings, path)


def test_invalid_yaml_is_refused(tmp_path):
    path = write_yaml(tmp_path, "broken.yaml", "run: [unclosed\n")

    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML"):
        load_config(Settings, path)


def test_yaml_syntax_error_is_reported_on_one_line(tmp_path):
    path = write_yaml(tmp_path, "broken.yaml", "run:\n  steps: 3\n   name: x\n")

    with pytest.raises(ConfigError) as raised:
        load_config(Settings, path)

    assert "line 3" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_file_holding_a_list_is_refused(tmp_path):
    path = write_yaml(tmp_path, "list.yaml", "- 1\n- 2\n")

    with pytest.raises(ConfigError, match=r"list\.yaml must hold keys and values"):
        load_config(Settings, path)


def test_value_in_place_of_a_section_names_the_section(tmp_path):
    path = write_yaml(tmp_path, "flat.yaml", "run: 5\n")

    with pytest.raises(ConfigError, match=r"'run' in .*flat\.yaml: expected a section"):
        load_config(Settings, path)


def test_value_in_place_of_a_nested_section_names_the_full_key():
    @dataclass
    class Outer:
        inner: Settings = field(default_factory=Settings)

    with pytest.raises(ConfigError, match=r"'inner\.model' in command line"):
        load_config(Outer, None, ["inner.model=big"])


def test_override_without_a_key_is_refused():
    with pytest.raises(ConfigError, match=r"override '=5' must look like key=value"):
        load_config(Settings, None, ["=5"])


def test_result_is_the_dataclass_itself():
    config = load_config(Settings)

    assert type(config) is Settings
    assert type(config.run) is RunSettings
