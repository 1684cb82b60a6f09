"""What every training stage shares: run folders, metrics, resumable state, signals, DDP.

A run lives in `runs/<name>/`: `state.pt` (model + optimizer + step, written atomically and
loaded with `weights_only=True`), `metrics.jsonl`, `samples/` and `checkpoint/` (the model as a
checkpoint folder the app can load). Under `torchrun` each process joins a process group (gloo
on CPU, NCCL on GPU); only rank 0 writes files and logs.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, bad start-up); the message says what to check."""


@dataclass
class DataConfig:
    index: str | None = "../shared/data/index.jsonl"  # photos listed in an index.jsonl …
    folder: str | None = None  # … or a folder of photos (takes precedence)
    labels: str | None = None  # folder of same-named label maps (layout stage)
    edges: str | None = None  # folder of same-named edge maps (optional)
    depth: str | None = None  # folder of same-named depth maps (optional)
    split: str = "train"
    min_nature_share: float = 0.0  # keep landscape-rich photos only
    crop: int = 128
    max_short_side: int = 256  # photos are held in memory at most this size
    limit: int = 0  # use only the first N photos (0: all), for quick trials


@dataclass
class RunConfig:
    name: str = "run"
    out: str = "runs"
    steps: int = 100_000
    minutes: float = 0.0  # stop after this long (0: no limit); state is saved first
    batch_size: int = 8
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    checkpoint_minutes: float = 5.0
    threads: int = 0  # torch CPU threads (0: torch's default)
    bf16: bool = True  # bf16 autocast (CPU and CUDA)
    max_bad_steps: int = 5  # consecutive non-finite losses before giving up
    ddp_timeout_s: int = 120  # a rank that does not arrive in this time ends the job


# ----------------------------------------------------------------------------- distributed


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout_s: int) -> Distributed:
    """Join the process group when started by torchrun; otherwise a single process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Distributed(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        if not dist.is_initialized():  # a stage may have joined early, to shard its data
            timeout = datetime.timedelta(seconds=timeout_s)
            dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world)
            dist.barrier()
    except Exception as error:  # the store raises several kinds on timeout or a taken port
        raise TrainingError(
            f"rank {rank}: the process group did not form within {timeout_s} s ({error}); "
            "check that every rank started and that MASTER_PORT is free"
        ) from None
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return Distributed(rank, world, device)


def average_gradients(parameters, dist_info: Distributed) -> None:
    """Average .grad over ranks so every rank takes the same optimizer step.

    A parameter one rank did not use this step (its batch had another task, say) has no .grad
    there: it counts as zero in the average, and stays without a gradient only where no rank
    used it, so every rank sends the same-sized buffer and steps the same parameters.
    """
    if dist_info.world == 1:
        return
    trained = [p for p in parameters if p.requires_grad]
    if not trained:
        return
    device = trained[0].device
    used = torch.tensor([p.grad is not None for p in trained], dtype=torch.float32, device=device)
    flat = torch.cat(
        [used]
        + [
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
            for p in trained
        ]
    )
    dist.all_reduce(flat)
    used_anywhere = flat[: len(trained)] > 0
    flat = flat[len(trained) :] / dist_info.world
    offset = 0
    for parameter, anywhere in zip(trained, used_anywhere.tolist(), strict=True):
        count = parameter.numel()
        if anywhere:
            average = flat[offset : offset + count].view_as(parameter).to(parameter.dtype)
            if parameter.grad is None:
                parameter.grad = average.clone()
            else:
                parameter.grad.copy_(average)
        offset += count


def broadcast_(tensor: torch.Tensor, dist_info: Distributed) -> None:
    """Make rank 0's value of `tensor` everyone's (decisions are made once)."""
    if dist_info.world > 1:
        dist.broadcast(tensor, src=0)


def broadcast_module_(module: torch.nn.Module, dist_info: Distributed) -> None:
    """Give every rank rank 0's weights and buffers (each process draws its own initial ones)."""
    if dist_info.world > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def all_reduce_sum_(tensor: torch.Tensor, dist_info: Distributed) -> None:
    if dist_info.world > 1:
        dist.all_reduce(tensor)


def stop_flag_any(flag: bool, dist_info: Distributed) -> bool:
    """True on every rank when any rank wants to stop."""
    if dist_info.world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value)
    return bool(value.item() > 0)


# ----------------------------------------------------------------------------- the run


class Run:
    """Folder, metrics, state saving, signals and the step loop of one training run."""

    def __init__(self, config: RunConfig, stage: str, config_yaml: str):
        self.config = config
        self.stage = stage
        self.dist = setup_distributed(config.ddp_timeout_s)
        self.folder = Path(config.out) / config.name
        self.state_path = self.folder / "state.pt"
        self.stop_requested = False
        self.bad_steps = 0
        self.started = time.monotonic()
        self.last_save = time.monotonic()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        if self.dist.is_main:
            (self.folder / "samples").mkdir(parents=True, exist_ok=True)
            (self.folder / "config.yaml").write_text(config_yaml)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        logger.warning("signal %d: saving state and stopping after this step", signum)
        self.stop_requested = True

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def autocast(self):
        enabled = self.config.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------------ metrics

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        row = {"step": step, "time_s": round(time.monotonic() - self.started, 2)}
        row.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
        with open(self.folder / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def check_finite(self, loss: torch.Tensor, step: int, hint: str) -> bool:
        """False (skip the step) for a NaN/inf loss; raises after too many in a row."""
        finite = bool(torch.isfinite(loss.detach()).all())
        finite = not stop_flag_any(not finite, self.dist)
        if finite:
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        logger.warning("step %d: loss is not finite, skipping the step", step)
        if self.bad_steps >= self.config.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} non-finite losses in a row at step {step}; likely cause: "
                f"{hint}. Lower the learning rate or resume from the last state"
            )
        return False

    # ------------------------------------------------------------------ state

    def save_state(self, state: dict[str, Any]) -> None:
        """Write state.pt atomically (rank 0 only)."""
        if self.dist.is_main:
            temporary = self.state_path.with_suffix(".tmp")
            torch.save(state, temporary)
            os.replace(temporary, self.state_path)
        self.last_save = time.monotonic()

    def load_state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        return torch.load(self.state_path, map_location="cpu", weights_only=True)

    def due_for_save(self) -> bool:
        elapsed = time.monotonic() - self.last_save
        return stop_flag_any(elapsed >= 60 * self.config.checkpoint_minutes, self.dist)

    def out_of_time(self) -> bool:
        limit = self.config.minutes
        late = limit > 0 and time.monotonic() - self.started >= 60 * limit
        return stop_flag_any(late or self.stop_requested, self.dist)

    def progress(self, start_step: int):
        return tqdm(
            total=self.config.steps,
            initial=start_step,
            desc=self.stage,
            disable=not self.dist.is_main,
            dynamic_ncols=True,
            mininterval=2.0,
        )

    def close(self) -> None:
        if self.dist.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def cosine_lr(step: int, base: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor` × base."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
