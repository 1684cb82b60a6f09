"""Benchmark: images/s of the full stage-1 training step on CPU, and where its time goes.

The headline figure runs `VQGANTrainer.train_step` itself (bf16 autocast + channels_last, past
`gan_start`, so L1 + perceptual + adaptive GAN term and the discriminator step all run). A copy
of that step with a timer around each part splits the seconds, once in bf16 + channels_last and
once in fp32 with the default memory format. Images are random tensors: no data loading.

    python bench/vqgan_train.py --json [--config configs/vqgan.yaml --threads 2 --steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from core.config import load_config  # noqa: E402
from core.losses import (  # noqa: E402
    PatchDiscriminator,
    PerceptualDistance,
    adaptive_gan_weight,
    hinge_d_loss,
)
from core.train_vqgan import VQGANTrainConfig, VQGANTrainer  # noqa: E402
from core.training import Run  # noqa: E402
from core.vqgan import VQGAN  # noqa: E402

PARTS = ("encoder_decoder_forward", "perceptual", "discriminator", "adaptive_weight")
PARTS += ("backward", "optimizer")


class RandomBatches:
    """Stands in for the photo crops: uniform noise in [-1, 1], same tensor as input and target."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.rand(batch_size, 3, self.size, self.size, generator=self.generator)
        images = images * 2 - 1
        return images, images


# ----------------------------------------------------------------------------- the real step


def trainer_throughput(config: VQGANTrainConfig, warmup: int, steps: int) -> dict:
    """Images/s of `VQGANTrainer.train_step` with every loss term active."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with tempfile.TemporaryDirectory() as folder:
        config.run.out = folder
        run = Run(config.run, "bench", "")
        for signum, handler in previous.items():  # Run traps Ctrl-C for training; undo that
            signal.signal(signum, handler)
        trainer = VQGANTrainer(config, run, RandomBatches(config.data.crop))
        trainer.step = max(config.loss.disc_start, config.loss.gan_start)
        for _ in range(warmup):
            trainer.train_step()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            metrics = trainer.train_step()
        seconds = (time.perf_counter() - start) / steps
        cpu_seconds = (time.process_time() - cpu_start) / steps
    if "adaptive_weight" not in metrics or "d_loss" not in metrics:
        raise RuntimeError("the GAN terms did not run; check loss.disc_start / loss.gan_start")
    return {
        "mode": "bf16 autocast + channels_last" if config.run.bf16 else "fp32",
        "seconds_per_step": round(seconds, 3),
        "images_per_s": round(config.run.batch_size / seconds, 2),
        "cpu_seconds_per_step": round(cpu_seconds, 3),
        "images_per_cpu_s": round(config.run.batch_size / cpu_seconds, 2),
        "steps_timed": steps,
    }


# ----------------------------------------------------------------------------- the timed copy


@dataclass
class StepModels:
    model: VQGAN
    perceptual: PerceptualDistance
    discriminator: PatchDiscriminator
    model_optimizer: torch.optim.Optimizer
    disc_optimizer: torch.optim.Optimizer


def build_models(config: VQGANTrainConfig, channels_last: bool) -> StepModels:
    torch.manual_seed(config.run.seed)
    model = VQGAN(config.model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loss = config.loss
    discriminator = PatchDiscriminator(
        config.model.out_channels, loss.disc_channels, loss.disc_layers
    )
    return StepModels(
        model=model,
        perceptual=PerceptualDistance(),
        discriminator=discriminator,
        model_optimizer=torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.5, 0.9)),
        disc_optimizer=torch.optim.Adam(
            discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.9)
        ),
    )


class Timers:
    """Wall and CPU seconds spent in each named part, summed over the timed steps."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, part: str):
        start, cpu_start = time.perf_counter(), time.process_time()
        yield
        self.seconds[part] += time.perf_counter() - start
        self.cpu_seconds[part] += time.process_time() - cpu_start


def timed_step(
    models: StepModels, config: VQGANTrainConfig, images: torch.Tensor, bf16: bool, timers
) -> None:
    """One generator + discriminator step as `VQGANTrainer` takes it, each part timed."""
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    model, discriminator = models.model, models.discriminator
    target = images

    with timers("encoder_decoder_forward"), autocast():
        output, quantized = model(images)
    with timers("perceptual"):
        l1 = (output.float() - target).abs().mean()
        perceptual = models.perceptual(output.float(), target).mean()
        rec_loss = l1 + config.loss.perceptual_weight * perceptual
    with timers("discriminator"), autocast():
        gan_loss = -discriminator(output).float().mean()
    with timers("adaptive_weight"):
        weight = adaptive_gan_weight(rec_loss, gan_loss, model.last_layer())
    loss = rec_loss + quantized.loss + config.loss.disc_weight * weight * gan_loss
    with timers("backward"):
        models.model_optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with timers("optimizer"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        models.model_optimizer.step()

    with timers("discriminator"), autocast():
        logits_real = discriminator(target)
        logits_fake = discriminator(output.detach())
    disc_loss = hinge_d_loss(logits_real.float(), logits_fake.float())
    with timers("backward"):
        models.disc_optimizer.zero_grad(set_to_none=True)
        disc_loss.backward()
    with timers("optimizer"):
        models.disc_optimizer.step()


def breakdown(
    config: VQGANTrainConfig, bf16: bool, channels_last: bool, warmup: int, steps: int
) -> dict:
    """Seconds per step in each part, and the images/s of the timed copy."""
    models = build_models(config, channels_last)
    batches = RandomBatches(config.data.crop, seed=1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    warming, measured = Timers(), Timers()
    for index in range(warmup + steps):
        images = batches.batch(index, config.run.batch_size)[0]
        images = images.contiguous(memory_format=memory_format)
        timed_step(models, config, images, bf16, warming if index < warmup else measured)
    total = sum(measured.seconds.values()) / steps
    cpu_total = sum(measured.cpu_seconds.values()) / steps
    return {
        "mode": ("bf16 autocast" if bf16 else "fp32")
        + (" + channels_last" if channels_last else ", default memory format"),
        "seconds_per_step": {part: round(measured.seconds[part] / steps, 3) for part in PARTS},
        "cpu_seconds_per_step": {
            part: round(measured.cpu_seconds[part] / steps, 3) for part in PARTS
        },
        "total_seconds_per_step": round(total, 3),
        "total_cpu_seconds_per_step": round(cpu_total, 3),
        "images_per_s": round(config.run.batch_size / total, 2),
        "images_per_cpu_s": round(config.run.batch_size / cpu_total, 2),
    }


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/vqgan.yaml", help="stage-1 training YAML")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    config = load_config(VQGANTrainConfig, args.config, [f"run.threads={args.threads}"])
    config.run.bf16 = True
    load_at_start = os.getloadavg()

    headline = trainer_throughput(config, args.warmup, args.steps)
    fast = breakdown(config, True, True, args.warmup, args.steps)
    reference = breakdown(config, False, False, args.warmup, args.steps)
    model = config.model
    report = {
        "benchmark": "stage-1 VQGAN training step (generator + discriminator), CPU",
        "config": args.config,
        "image_size": config.data.crop,
        "batch_size": config.run.batch_size,
        "model": {
            "f": model.downsample_factor,
            "channels": model.channels,
            "channel_mult": model.channel_mult,
            "codebook_size": model.codebook_size,
            "parameters_millions": round(
                sum(p.numel() for p in VQGAN(model).parameters()) / 1e6, 2
            ),
        },
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1min_at_start": round(load_at_start[0], 2),
            "note": "shared machine: other processes (a training run) were using CPU while "
            "this was measured, so wall-clock figures are lower bounds; CPU seconds (this "
            "process's own, summed over its threads) are less disturbed by the sharing and, "
            "with --threads 1, estimate the wall time on an idle core",
        },
        "trainer_step": headline,
        "breakdown": fast,
        "reference_fp32": reference,
        "speedup_bf16_channels_last_over_fp32": round(
            reference["total_seconds_per_step"] / fast["total_seconds_per_step"], 2
        ),
        "speedup_in_cpu_seconds": round(
            reference["total_cpu_seconds_per_step"] / fast["total_cpu_seconds_per_step"], 2
        ),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"trainer step: {headline['images_per_s']} images/s ({headline['mode']})")
        for name in ("breakdown", "reference_fp32"):
            part = report[name]
            print(f"{part['mode']}: {part['images_per_s']} images/s")
            for key, seconds in part["seconds_per_step"].items():
                print(f"  {key:<24} {seconds:7.3f} s/step")
        print(f"speed-up over fp32: {report['speedup_bf16_channels_last_over_fp32']}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
