"""Training that survives: killed runs resume where their last state left off, SIGTERM saves
and exits, resuming replays the same data, bad losses are skipped and then reported, and a
collapsed discriminator is named.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import training
from core.checkpoint import load_checkpoint
from core.condition_stages import ConditionBatches
from core.data import PhotoCrops, read_folder
from core.palette import Palette
from core.stages import run_stage
from core.train_vqgan import LossConfig, VQGANTrainConfig, VQGANTrainer
from core.training import Run, RunConfig, TrainingError

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = REPO_ROOT / "configs" / "tiny"


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """A Run installs SIGTERM / SIGINT handlers; give pytest its own back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def write_landscapes(folder: Path, count: int, labels: Path | None = None) -> Path:
    """Synthetic photos (sky over grass, a brown peak) and, optionally, their label maps."""
    folder.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        labels.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for index in range(count):
        height, width = 72, 88
        horizon = int(rng.integers(30, 50))
        peak = int(rng.integers(20, 68))
        ids = np.full((height, width), 3, dtype=np.uint8)  # grass
        ids[:horizon] = 1  # sky
        for row in range(horizon - 15, horizon):  # a triangular mountain on the horizon
            half = (row - horizon + 15) * 2
            ids[row, max(0, peak - half) : peak + half] = 5
        colours = np.array([[0, 0, 0], [110, 170, 235], [0, 0, 0], [70, 150, 45], [0, 0, 0],
                            [140, 95, 60]], dtype=np.uint8)  # fmt: skip
        noise = rng.integers(-12, 13, (height, width, 3))
        pixels = np.clip(colours[ids].astype(int) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"view_{index:02d}.png")
        if labels is not None:
            Image.fromarray(ids, mode="L").save(labels / f"view_{index:02d}.png")
    return folder


def train_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "train.py"), *args]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def metric_steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def logged_steps_so_far(run: Path) -> list[int]:
    """The steps logged by a run still writing (a line may be half written)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def start_training(*args: str, log: Path) -> subprocess.Popen:
    """train.py in the background, its messages going to `log` (a pipe could fill and stall it)."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            train_command(*args), env=environment(), stderr=handle, stdout=subprocess.DEVNULL
        )


def wait_for(condition, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training did not get there in time")
        time.sleep(0.1)


def saved_step(state_path: Path) -> int:
    try:
        return int(torch.load(state_path, weights_only=True)["step"])
    except FileNotFoundError:
        return -1


# ----------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_state(tmp_path):
    photos = write_landscapes(tmp_path / "photos", 4)
    run = tmp_path / "runs" / "killed"
    common = [
        "vqgan", "--config", str(TINY / "vqgan.yaml"), f"data.folder={photos}",
        f"run.out={tmp_path / 'runs'}", "run.name=killed", "run.batch_size=2", "run.log_every=1",
        "run.checkpoint_minutes=0.02",  # a state every 1.2 s
    ]  # fmt: skip
    log = tmp_path / "first.log"
    first = start_training(*common, "run.steps=10000", log=log)
    wait_for(lambda: saved_step(run / "state.pt") >= 1, 90, first, log)
    wait_for(lambda: logged_steps_so_far(run)[-1] > saved_step(run / "state.pt"), 30, first, log)
    first.send_signal(signal.SIGKILL)  # no chance to save: between two checkpoints
    first.wait(timeout=10)

    state = torch.load(run / "state.pt", weights_only=True)
    saved = int(state["step"])
    assert load_checkpoint(run / "checkpoint", kind="vqgan:image").extra["step"] >= 1
    rows_before = len(metric_steps(run))

    resumed = subprocess.run(
        train_command(*common, "--resume", f"run.steps={saved + 3}"),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run} at step {saved}" in resumed.stderr
    assert metric_steps(run)[rows_before:] == [saved + 1, saved + 2, saved + 3]
    final = torch.load(run / "state.pt", weights_only=True)
    assert final["step"] == saved + 3
    adam_steps = {float(s["step"]) for s in final["model_optimizer"]["state"].values()}
    assert adam_steps == {saved + 3.0}  # the optimizer's own count went on too
    assert load_checkpoint(run / "checkpoint", kind="vqgan:image").extra["step"] == saved + 3
    assert not (run / "state.tmp").exists()


@pytest.mark.slow
def test_sigterm_saves_the_state_and_exits_cleanly(tmp_path):
    photos = write_landscapes(tmp_path / "photos", 4, labels=tmp_path / "labels")
    run = tmp_path / "runs" / "stopped"
    log = tmp_path / "train.log"
    process = start_training(
        "condition", "--config", str(TINY / "layout.yaml"), f"data.folder={photos}",
        f"data.labels={tmp_path / 'labels'}", f"run.out={tmp_path / 'runs'}", "run.name=stopped",
        "run.steps=10000", "run.log_every=1",
        "run.checkpoint_minutes=60",  # no timed save: only the signal saves
        log=log,
    )  # fmt: skip
    wait_for(lambda: len(logged_steps_so_far(run)) >= 2, 60, process, log)

    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=30)
    stderr = log.read_text()

    assert returncode == 0, stderr[-3000:]
    assert "signal 15: saving state and stopping after this step" in stderr
    assert "Traceback" not in stderr
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] == metric_steps(run)[-1]
    assert state["step"] < 10000
    checkpoint = load_checkpoint(run / "checkpoint", kind="vqgan:layout")
    assert checkpoint.extra["step"] == state["step"]


def test_resuming_gives_the_weights_of_a_run_never_stopped(tmp_path, monkeypatch):
    photos = write_landscapes(tmp_path / "photos", 4, labels=tmp_path / "labels")
    overrides = [
        f"data.folder={photos}", f"data.labels={tmp_path / 'labels'}",
        f"run.out={tmp_path / 'runs'}", "run.steps=6", "run.batch_size=4", "run.log_every=1",
        "restart_every=0",  # restarts look at recent batches, which a state does not keep
    ]  # fmt: skip
    layout = TINY / "layout.yaml"
    torch.manual_seed(0)  # the same initial weights for both runs
    run_stage("condition", layout, [*overrides, "run.name=straight"], resume=False)

    log = training.Run.log

    def log_then_stop_at_step_3(self, step, metrics):
        log(self, step, metrics)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster would, mid-run

    monkeypatch.setattr(training.Run, "log", log_then_stop_at_step_3)
    torch.manual_seed(0)
    run_stage("condition", layout, [*overrides, "run.name=interrupted"], resume=False)
    stopped = torch.load(tmp_path / "runs" / "interrupted" / "state.pt", weights_only=True)
    monkeypatch.setattr(training.Run, "log", log)
    run_stage("condition", layout, [*overrides, "run.name=interrupted"], resume=True)

    straight = torch.load(tmp_path / "runs" / "straight" / "state.pt", weights_only=True)
    resumed = torch.load(tmp_path / "runs" / "interrupted" / "state.pt", weights_only=True)
    assert stopped["step"] == 3
    assert resumed["step"] == straight["step"] == 6
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert metric_steps(tmp_path / "runs" / "interrupted") == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- data order


def test_the_crops_of_a_step_are_the_same_after_a_restart():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(3)]

    before = PhotoCrops(images, 32, seed=7)
    later_step = before.batch(12, 4)
    restarted = PhotoCrops(images, 32, seed=7)  # a new process, straight at step 12

    assert torch.equal(restarted.batch(12, 4), later_step)
    assert not torch.equal(restarted.batch(13, 4), later_step)
    assert not torch.equal(PhotoCrops(images, 32, seed=8).batch(12, 4), later_step)


def test_condition_crops_of_a_step_are_the_same_after_a_restart(tmp_path):
    photos = write_landscapes(tmp_path / "photos", 3, labels=tmp_path / "labels")
    records = read_folder(photos, tmp_path / "labels")
    palette = Palette.default()

    first = ConditionBatches("layout", records, 32, 5, palette)
    inputs, ids = first.batch(4, 3)
    again = ConditionBatches("layout", records, 32, 5, palette)
    other_rank = ConditionBatches("layout", records, 32, 5, palette, rank=1)

    assert torch.equal(again.batch(4, 3)[1], ids)
    assert torch.equal(again.batch(4, 3)[0], inputs)
    assert not torch.equal(other_rank.batch(4, 3)[1], ids)


# ----------------------------------------------------------------------------- atomic state


def test_a_failed_save_leaves_the_previous_state_whole(tmp_path, monkeypatch):
    run = Run(RunConfig(out=str(tmp_path), name="atomic"), "test", "{}\n")
    run.save_state({"step": 1, "weights": torch.ones(3)})

    def write_half_then_fail(state, path):
        Path(path).write_bytes(b"PK\x03\x04 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(training.torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        run.save_state({"step": 2, "weights": torch.zeros(3)})

    state = torch.load(tmp_path / "atomic" / "state.pt", weights_only=True)
    assert state["step"] == 1
    assert torch.equal(state["weights"], torch.ones(3))


# ----------------------------------------------------------------------------- bad losses


class NoiseBatches:
    """Random images, the same for a given step: enough for a trainer to take steps."""

    def batch(self, step: int, size: int):
        generator = torch.Generator().manual_seed(step)
        images = torch.rand(size, 3, 32, 32, generator=generator) * 2 - 1
        return images, images


def tiny_trainer(tmp_path, tiny_vqgan_config, **run_values) -> VQGANTrainer:
    run_config = RunConfig(out=str(tmp_path), name="bad", steps=20, batch_size=2, **run_values)
    loss = LossConfig(disc_channels=16, disc_layers=1, disc_start=0, gan_start=0)
    config = VQGANTrainConfig(
        model=tiny_vqgan_config, run=run_config, loss=loss, restart_every=0, warmup=1
    )
    return VQGANTrainer(config, Run(run_config, "test", "{}\n"), NoiseBatches())


def poison_reconstruction(trainer: VQGANTrainer, monkeypatch, bad_steps: set[int]) -> None:
    """Make the reconstruction loss NaN at the given steps (as a diverging run would)."""
    honest = trainer.reconstruction_loss

    def reconstruction_loss(output, target):
        loss, metrics = honest(output, target)
        return (loss * float("nan"), metrics) if trainer.step in bad_steps else (loss, metrics)

    monkeypatch.setattr(trainer, "reconstruction_loss", reconstruction_loss)


def test_a_non_finite_loss_skips_the_step_with_a_warning(
    tmp_path, tiny_vqgan_config, monkeypatch, caplog
):
    trainer = tiny_trainer(tmp_path, tiny_vqgan_config)
    poison_reconstruction(trainer, monkeypatch, bad_steps={1})
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    disc_before = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}

    with caplog.at_level(logging.WARNING, logger="core.training"):
        metrics = trainer.train_step()

    assert "step 1: loss is not finite, skipping the step" in caplog.text
    assert "loss" not in metrics and "d_loss" not in metrics
    assert trainer.step == 2
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    for name, tensor in trainer.discriminator.state_dict().items():
        assert torch.equal(tensor, disc_before[name]), name
    assert np.isfinite(trainer.train_step()["loss"])  # and training goes on


def test_a_non_finite_first_step_skips_the_discriminator_too(
    tmp_path, tiny_vqgan_config, monkeypatch
):
    trainer = tiny_trainer(tmp_path, tiny_vqgan_config)
    poison_reconstruction(trainer, monkeypatch, bad_steps={0})

    metrics = trainer.train_step()  # nothing for the discriminator to judge yet

    assert "d_loss" not in metrics
    assert "d_loss" in trainer.train_step()


def test_non_finite_losses_in_a_row_stop_training_naming_the_cause(
    tmp_path, tiny_vqgan_config, monkeypatch
):
    trainer = tiny_trainer(tmp_path, tiny_vqgan_config, max_bad_steps=3)
    poison_reconstruction(trainer, monkeypatch, bad_steps={0, 1, 3, 4, 5})

    for _ in range(5):  # bad, bad, good (the count starts again), bad, bad
        trainer.train_step()
    with pytest.raises(TrainingError) as error:
        trainer.train_step()

    assert str(error.value) == (
        "3 non-finite losses in a row at step 5; likely cause: a learning rate too high for this "
        "batch. Lower the learning rate or resume from the last state"
    )


# ----------------------------------------------------------------------------- discriminator


def test_a_discriminator_stuck_at_one_is_reported_as_collapsed(tmp_path, tiny_vqgan_config):
    trainer = tiny_trainer(tmp_path, tiny_vqgan_config)
    last_conv = trainer.discriminator.net[-1]
    torch.nn.init.zeros_(last_conv.weight)
    torch.nn.init.zeros_(last_conv.bias)  # logits 0 for everything: hinge loss exactly 1.0
    trainer.disc_loss_history = [1.0] * 199

    assert trainer.collapse_warning() is None  # not yet 200 steps of it
    metrics = trainer.train_step()

    assert metrics["d_loss"] == 1.0
    warning = trainer.collapse_warning()
    assert warning is not None
    assert "stayed at 1.0 for 200 steps" in warning
    assert "lower disc_lr or start it later" in warning


def test_a_learning_discriminator_is_not_reported(tmp_path, tiny_vqgan_config):
    trainer = tiny_trainer(tmp_path, tiny_vqgan_config)
    trainer.disc_loss_history = [1.0, 0.6] * 100  # mean 0.8: it tells real from fake

    assert trainer.collapse_warning() is None
