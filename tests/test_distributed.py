"""Data-parallel training on CPU: two gloo processes stay identical, write one set of files, and
draw different crops; a rank that never arrives or a taken port ends the job with a message.

The two-process runs go through `python -m torch.distributed.run` (torchrun) exactly as a user
starts them, with a small wrapper that also dumps each rank's weights where the test can see them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoint import load_checkpoint
from core.data import PhotoCrops

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_VQGAN = REPO_ROOT / "configs" / "tiny" / "vqgan.yaml"

# Runs train.py as torchrun would, but also saves every rank's weights (and a checksum of its
# first batch) into DUMPS, so the test can compare ranks. Only the test adds these files.
RANK_DUMPING_TRAIN = """
import sys
from pathlib import Path

import torch

sys.path.insert(0, {repo!r})
import train
from core import stages, training

DUMPS = Path({dumps!r})
save_state = training.Run.save_state
image_batch = stages.ImageBatches.batch


def save_state_and_dump(self, state):
    save_state(self, state)
    weights = dict(state["model"])
    weights.update({{f"discriminator.{{k}}": v for k, v in state["discriminator"].items()}})
    torch.save(weights, DUMPS / f"rank{{self.dist.rank}}-step{{state['step']}}.pt")


def batch_and_dump(self, step, size):
    images, target = image_batch(self, step, size)
    if step == 0:
        torch.save(images, DUMPS / f"batch0-rank{{self.crops.rank}}.pt")
    return images, target


training.Run.save_state = save_state_and_dump
stages.ImageBatches.batch = batch_and_dump
sys.exit(train.main())
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_photos(folder: Path, count: int) -> Path:
    """Synthetic landscapes: a sky gradient over darker ground, each with its own horizon."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        height, width = 72, 88
        horizon = int(rng.integers(25, 50))
        rows = np.linspace(0.0, 1.0, height)[:, None, None]
        sky = (80, 140, 230) + rows * (120, 80, 20)
        ground = (70, 130, 40) - rows * (40, 60, 20)
        pixels = np.where(np.arange(height)[:, None, None] < horizon, sky, ground)
        pixels = np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"view_{index:02d}.png")
    return folder


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_each_rank_crops_its_own_share_of_the_photos():
    images = [np.full((40, 40, 3), 10 * index, dtype=np.uint8) for index in range(4)]

    rank0 = PhotoCrops(images, 32, seed=0, rank=0, world=2)
    rank1 = PhotoCrops(images, 32, seed=0, rank=1, world=2)

    assert [int(image[0, 0, 0]) for image in rank0.images] == [0, 20]
    assert [int(image[0, 0, 0]) for image in rank1.images] == [10, 30]
    assert not torch.equal(rank0.batch(0, 4), rank1.batch(0, 4))


def test_a_single_photo_serves_every_rank():
    images = [np.zeros((40, 40, 3), dtype=np.uint8)]

    crops = PhotoCrops(images, 32, seed=0, rank=1, world=2)

    assert crops.batch(0, 2).shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_two_gloo_ranks_stay_identical_and_write_one_checkpoint(tmp_path):
    photos = write_photos(tmp_path / "photos", 6)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    script = tmp_path / "train_dumping_ranks.py"
    script.write_text(RANK_DUMPING_TRAIN.format(repo=str(REPO_ROOT), dumps=str(dumps)))
    overrides = [
        f"data.folder={photos}",
        f"run.out={tmp_path / 'runs'}",
        "run.name=ddp",
        "run.steps=4",
        "run.batch_size=2",
        "run.log_every=1",
        "run.sample_every=2",
        "loss.disc_start=1",  # discriminator and GAN term both active within the four steps
        "loss.gan_start=2",
        "restart_every=2",  # dead-code restarts: rank 0 decides, the others follow
        "usage_window=2",
    ]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), str(script), "vqgan", "--config", str(TINY_VQGAN),
        *overrides,
    ]  # fmt: skip

    result = subprocess.run(
        command, env=environment(), capture_output=True, text=True, timeout=150, cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(dumps / "rank0-step4.pt", weights_only=True)
    rank1 = torch.load(dumps / "rank1-step4.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    differing = [name for name in rank0 if not torch.equal(rank0[name], rank1[name])]
    assert differing == []
    run = tmp_path / "runs" / "ddp"
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] == 4
    for name, tensor in state["model"].items():
        assert torch.equal(tensor, rank1[name]), name
    restarts = [line for line in result.stderr.splitlines() if "dead codebook entries" in line]
    assert len(restarts) == 1  # decided (and logged) by rank 0 alone
    assert "step 2: restarted" in restarts[0]
    batch0 = torch.load(dumps / "batch0-rank0.pt", weights_only=True)
    batch1 = torch.load(dumps / "batch0-rank1.pt", weights_only=True)
    assert not torch.equal(batch0, batch1)
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint",
        "config.yaml",
        "metrics.jsonl",
        "samples",
        "state.pt",
    ]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["0000002.png", "0000004.png"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert load_checkpoint(run / "checkpoint", kind="vqgan:image").extra["step"] == 4


def test_a_rank_that_never_arrives_ends_the_job_with_a_message(tmp_path):
    photos = write_photos(tmp_path / "photos", 2)
    alone = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env = {**environment(), **alone, "MASTER_PORT": str(free_port())}
    command = [
        sys.executable, str(REPO_ROOT / "train.py"), "vqgan", "--config", str(TINY_VQGAN),
        f"data.folder={photos}", f"run.out={tmp_path / 'runs'}", "run.ddp_timeout_s=5",
    ]  # fmt: skip

    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - started

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "rank 0: the process group did not form within 5 s" in result.stderr
    assert elapsed < 5 + 45  # the timeout plus start-up, on a busy machine
    assert not (tmp_path / "runs" / "run" / "state.pt").exists()


def test_a_taken_port_ends_the_job_with_a_message(tmp_path):
    photos = write_photos(tmp_path / "photos", 2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        alone = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        env = {**environment(), **alone, "MASTER_PORT": str(port)}
        command = [
            sys.executable, str(REPO_ROOT / "train.py"), "vqgan", "--config", str(TINY_VQGAN),
            f"data.folder={photos}", f"run.out={tmp_path / 'runs'}", "run.ddp_timeout_s=30",
        ]  # fmt: skip

        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "address already in use" in result.stderr.lower()
    assert "check that every rank started and that MASTER_PORT is free" in result.stderr


def _average_unused_gradients(rank: int, store: str, results: str) -> None:
    """One gloo rank of the test below: rank 0 used a and b this step, rank 1 used a and c."""
    from core.training import Distributed, average_gradients

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2
    )
    try:
        a, b, c, d = (torch.nn.Parameter(torch.zeros(2)) for _ in range(4))
        if rank == 0:
            a.grad, b.grad = torch.full((2,), 1.0), torch.full((2,), 4.0)
        else:
            a.grad, c.grad = torch.full((2,), 3.0), torch.full((2,), 6.0)
        average_gradients([a, b, c, d], Distributed(rank=rank, world=2))
        grads = {
            name: None if p.grad is None else p.grad.tolist()
            for name, p in zip("abcd", (a, b, c, d), strict=True)
        }
        Path(results, f"rank{rank}.json").write_text(json.dumps(grads))
    finally:
        torch.distributed.destroy_process_group()


def test_a_parameter_one_rank_did_not_use_is_averaged_as_zero_there(tmp_path):
    # Each rank's transformer batch has its own task, so a condition table one rank used can be
    # untouched (no .grad) on the other; the ranks must still exchange equal-sized buffers.
    torch.multiprocessing.spawn(
        _average_unused_gradients, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2
    )

    for rank in (0, 1):
        grads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert grads == {"a": [2.0, 2.0], "b": [2.0, 2.0], "c": [3.0, 3.0], "d": None}
