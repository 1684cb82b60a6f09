"""A decoder-only fine-tune keeps the tokens, so a transformer trained before it still bundles."""

from __future__ import annotations

import pytest
import torch
from test_custom_data import TINY, train_cli, write_good_photos

import train
from core.checkpoint import load_checkpoint

DATA = ["data.folder=photos", "data.labels=labels"]


def tune(*extra: str) -> None:
    train_cli(
        "vqgan", "--config", str(TINY / "vqgan.yaml"), *DATA, "run.name=tuned",
        "init=runs/tiny_vqgan/checkpoint", "decoder_only=true", "run.steps=3",
        "loss.disc_start=0", "loss.gan_start=1", *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_only_the_decoder_changes_and_the_bundle_takes_it(workdir):
    write_good_photos(workdir / "photos", workdir / "labels", 6)
    train_cli("vqgan", "--config", str(TINY / "vqgan.yaml"), *DATA, "run.steps=2")
    train_cli("cells", "out=cells", "downsample_factor=8")
    train_cli(
        "transformer", "--config", str(TINY / "transformer.yaml"), *DATA,
        "stages.layout=cells", "run.steps=2",
    )  # fmt: skip
    tune("model.channels=4")  # the config's model is replaced by init's

    before = load_checkpoint(workdir / "runs" / "tiny_vqgan" / "checkpoint")
    after = load_checkpoint(workdir / "runs" / "tuned" / "checkpoint")
    assert after.model == before.model
    assert after.extra["tokens_from"] == before.weights_sha256
    for name, tensor in before.state.items():
        same = torch.equal(tensor, after.state[name])
        frozen = name.startswith(("encoder.", "quant_conv.", "quantizer."))
        assert same == frozen, name  # frozen parts kept bit for bit; the rest trained

    train_cli(
        "bundle", "transformer=runs/tiny_transformer/checkpoint", "out=bundle",
        "image=runs/tuned/checkpoint",
    )  # fmt: skip
    bundled = load_checkpoint(workdir / "bundle" / "image")
    assert torch.equal(bundled.state["decoder.conv_out.weight"].float(),
                       after.state["decoder.conv_out.weight"].half().float())  # fmt: skip


def test_a_vqgan_with_other_tokens_is_refused_by_the_bundle(workdir, caplog):
    write_good_photos(workdir / "photos", workdir / "labels", 6)
    train_cli("vqgan", "--config", str(TINY / "vqgan.yaml"), *DATA, "run.steps=2")
    train_cli("cells", "out=cells", "downsample_factor=8")
    train_cli(
        "transformer", "--config", str(TINY / "transformer.yaml"), *DATA,
        "stages.layout=cells", "run.steps=2",
    )  # fmt: skip
    train_cli(
        "vqgan", "--config", str(TINY / "vqgan.yaml"), *DATA, "run.steps=2", "run.name=other",
        "run.seed=5",
    )  # fmt: skip

    code = train.main(
        ["bundle", "transformer=runs/tiny_transformer/checkpoint", "out=bundle",
         "image=runs/other/checkpoint"]
    )  # fmt: skip

    assert code == 2
    assert "makes other tokens than the stage the transformer was trained on" in caplog.text


def test_decoder_only_without_init_says_what_is_missing(workdir, caplog):
    code = train.main(
        ["vqgan", "--config", str(TINY / "vqgan.yaml"), "data.folder=photos", "decoder_only=true"]
    )
    assert code == 2
    assert "decoder_only=true needs init=FOLDER" in caplog.text
