"""Checkpoint folders and bundles: exact round trips, and clear refusals of broken files."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_strict,
    read_manifest,
    save_checkpoint,
    write_manifest,
)
from core.config import config_from_dict
from core.vqgan import VQGAN, VQGANConfig


def tiny_model(config: VQGANConfig, seed: int) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(config)


def save_tiny(folder: Path, config: VQGANConfig, seed: int = 0, **options) -> VQGAN:
    model = tiny_model(config, seed)
    save_checkpoint(folder, "image", config, model.state_dict(), "# tiny test model\n", **options)
    return model


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_is_bit_exact(tmp_path, tiny_vqgan_config):
    original = save_tiny(tmp_path / "vqgan", tiny_vqgan_config, seed=0)

    checkpoint = load_checkpoint(tmp_path / "vqgan", kind="image")
    restored = tiny_model(config_from_dict(VQGANConfig, checkpoint.model, "test"), seed=1)
    load_state_strict(restored, checkpoint.state, "test")

    expected, actual = original.state_dict(), restored.state_dict()
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def test_model_config_is_read_back(tmp_path, tiny_vqgan_config):
    save_tiny(tmp_path / "vqgan", tiny_vqgan_config)

    checkpoint = load_checkpoint(tmp_path / "vqgan")

    assert checkpoint.kind == "image"
    assert checkpoint.model["codebook_size"] == 16
    assert checkpoint.model["channel_mult"] == [1, 2]
    assert config_from_dict(VQGANConfig, checkpoint.model, "test") == tiny_vqgan_config


def test_recorded_hash_is_the_weights_file_hash(tmp_path, tiny_vqgan_config):
    save_tiny(tmp_path / "vqgan", tiny_vqgan_config)

    checkpoint = load_checkpoint(tmp_path / "vqgan")

    assert checkpoint.weights_sha256 == sha256_of(tmp_path / "vqgan" / "weights.safetensors")


def test_folder_holds_config_weights_and_card(tmp_path, tiny_vqgan_config):
    save_tiny(tmp_path / "vqgan", tiny_vqgan_config)

    names = sorted(path.name for path in (tmp_path / "vqgan").iterdir())

    assert names == ["card.md", "config.yaml", "weights.safetensors"]
    assert (tmp_path / "vqgan" / "card.md").read_text() == "# tiny test model\n"


def test_half_stores_fp16_and_loads_into_fp32(tmp_path, tiny_vqgan_config):
    original = save_tiny(tmp_path / "vqgan", tiny_vqgan_config, half=True)

    checkpoint = load_checkpoint(tmp_path / "vqgan")
    restored = tiny_model(tiny_vqgan_config, seed=1)
    load_state_strict(restored, checkpoint.state, "test")

    codebook = "quantizer.codebook.weight"
    assert checkpoint.state[codebook].dtype == torch.float16
    assert restored.state_dict()[codebook].dtype == torch.float32
    expected = original.state_dict()[codebook].half().float()
    assert torch.equal(restored.state_dict()[codebook], expected)


def test_truncated_weights_are_refused(tmp_path, tiny_vqgan_config):
    save_tiny(tmp_path / "vqgan", tiny_vqgan_config)
    weights = tmp_path / "vqgan" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    with pytest.raises(CheckpointError, match="does not match the hash.*truncated"):
        load_checkpoint(tmp_path / "vqgan")


def test_weights_with_one_flipped_byte_are_refused(tmp_path, tiny_vqgan_config):
    save_tiny(tmp_path / "vqgan", tiny_vqgan_config)
    weights = tmp_path / "vqgan" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor: the file still parses
    weights.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_checkpoint(tmp_path / "vqgan")


def test_missing_weights_file_is_refused(tmp_path, tiny_vqgan_config):
    save_tiny(tmp_path / "vqgan", tiny_vqgan_config)
    (tmp_path / "vqgan" / "weights.safetensors").unlink()

    with pytest.raises(CheckpointError, match="weights.safetensors is missing"):
        load_checkpoint(tmp_path / "vqgan")


def test_config_without_provenance_loads_with_empty_extra(tmp_path, tiny_vqgan_config):
    save_tiny(tmp_path / "vqgan", tiny_vqgan_config)
    config_path = tmp_path / "vqgan" / "config.yaml"
    document = yaml.safe_load(config_path.read_text())
    del document["extra"]
    config_path.write_text(yaml.safe_dump(document))

    checkpoint = load_checkpoint(tmp_path / "vqgan")

    assert checkpoint.extra == {}


def test_wrong_kind_is_refused(tmp_path, tiny_vqgan_config):
    save_tiny(tmp_path / "vqgan", tiny_vqgan_config)

    with pytest.raises(CheckpointError, match="'image' model, expected 'layout'"):
        load_checkpoint(tmp_path / "vqgan", kind="layout")


def test_folder_without_config_is_not_a_checkpoint(tmp_path):
    (tmp_path / "photos").mkdir()

    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(tmp_path / "photos")


def test_absent_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_tensor_is_named(tiny_vqgan_config):
    state = tiny_model(tiny_vqgan_config, seed=0).state_dict()
    del state["decoder.conv_out.bias"]

    with pytest.raises(CheckpointError, match=r"tensor 'decoder\.conv_out\.bias' is missing"):
        load_state_strict(tiny_model(tiny_vqgan_config, seed=1), state, "test")


def test_unexpected_tensor_is_named(tiny_vqgan_config):
    state = tiny_model(tiny_vqgan_config, seed=0).state_dict()
    state["decoder.glaze.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError, match=r"unexpected tensor 'decoder\.glaze\.weight'"):
        load_state_strict(tiny_model(tiny_vqgan_config, seed=1), state, "test")


def test_mis_shaped_tensor_is_named_with_both_shapes(tiny_vqgan_config):
    state = tiny_model(tiny_vqgan_config, seed=0).state_dict()
    state["quantizer.codebook.weight"] = torch.zeros(32, 4)

    with pytest.raises(CheckpointError) as raised:
        load_state_strict(tiny_model(tiny_vqgan_config, seed=1), state, "test")

    message = str(raised.value)
    assert "'quantizer.codebook.weight'" in message
    assert "(32, 4)" in message
    assert "(16, 4)" in message


def test_checkpoint_of_a_bigger_codebook_does_not_load(tmp_path, tiny_vqgan_config):
    bigger = dataclasses.replace(tiny_vqgan_config, codebook_size=32)
    save_tiny(tmp_path / "vqgan", bigger)

    checkpoint = load_checkpoint(tmp_path / "vqgan")

    with pytest.raises(CheckpointError, match="quantizer.codebook.weight"):
        load_state_strict(tiny_model(tiny_vqgan_config, seed=1), checkpoint.state, "test")


def test_saving_over_a_checkpoint_replaces_it_and_leaves_no_temporaries(
    tmp_path, tiny_vqgan_config
):
    save_tiny(tmp_path / "vqgan", tiny_vqgan_config, seed=0)
    second = save_tiny(tmp_path / "vqgan", tiny_vqgan_config, seed=1)

    assert [path.name for path in tmp_path.iterdir()] == ["vqgan"]
    checkpoint = load_checkpoint(tmp_path / "vqgan")
    codebook = "quantizer.codebook.weight"
    assert torch.equal(checkpoint.state[codebook], second.state_dict()[codebook])


def make_bundle(bundle: Path, config: VQGANConfig) -> None:
    save_tiny(bundle / "image", config, seed=0)
    save_tiny(bundle / "layout", config, seed=1)


def test_bundle_manifest_round_trip(tmp_path, tiny_vqgan_config):
    bundle = tmp_path / "bundle"
    make_bundle(bundle, tiny_vqgan_config)

    path = write_manifest(bundle, {"image": "image", "layout": "layout"})
    models = read_manifest(bundle)

    assert path == bundle / "bundle.yaml"
    assert models == {
        "image": {
            "folder": "image",
            "weights_sha256": sha256_of(bundle / "image" / "weights.safetensors"),
        },
        "layout": {
            "folder": "layout",
            "weights_sha256": sha256_of(bundle / "layout" / "weights.safetensors"),
        },
    }


def test_bundle_with_a_replaced_model_names_the_role(tmp_path, tiny_vqgan_config):
    bundle = tmp_path / "bundle"
    make_bundle(bundle, tiny_vqgan_config)
    write_manifest(bundle, {"image": "image", "layout": "layout"})

    save_tiny(bundle / "layout", tiny_vqgan_config, seed=2)  # retrained in place

    with pytest.raises(CheckpointError, match="model 'layout' in layout is not the one"):
        read_manifest(bundle)


def test_folder_without_manifest_is_not_a_bundle(tmp_path, tiny_vqgan_config):
    make_bundle(tmp_path / "bundle", tiny_vqgan_config)

    with pytest.raises(CheckpointError, match="is not a model bundle: bundle.yaml is missing"):
        read_manifest(tmp_path / "bundle")
