"""Stage-1 training: the image VQGAN (L1 + perceptual + adaptive PatchGAN) and, with the same
loop, the condition stages (see `core.condition_stages` for their inputs and losses).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_strict,
    save_checkpoint,
    tokens_sha256,
)
from core.config import ConfigError, config_from_dict, config_to_yaml
from core.data import to_uint8
from core.losses import PatchDiscriminator, PerceptualDistance, adaptive_gan_weight, hinge_d_loss
from core.training import (
    DataConfig,
    Run,
    RunConfig,
    TrainingError,
    all_reduce_sum_,
    average_gradients,
    broadcast_,
    broadcast_module_,
    cosine_lr,
)
from core.vqgan import VQGAN, CodeUsage, VQGANConfig

logger = logging.getLogger(__name__)


@dataclass
class LossConfig:
    perceptual_weight: float = 0.1  # the uncalibrated distance is ~10x L1 in size
    disc_weight: float = 0.8  # multiplies the adaptive weight λ
    disc_start: int = 2000  # the discriminator trains from this step …
    gan_start: int = 3000  # … and the generator feels it from this one (≥ disc_start)
    disc_channels: int = 64
    disc_layers: int = 3


@dataclass
class VQGANTrainConfig:
    kind: str = "image"  # image | layout | edges | depth
    model: VQGANConfig = field(default_factory=VQGANConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lr: float = 2e-4
    disc_lr: float = 2e-4
    warmup: int = 200
    restart_every: int = 100  # steps between dead-code restarts (0: never)
    usage_window: int = 50  # batches over which codebook usage is counted
    init: str = ""  # a checkpoint folder of this kind to start from (its model config is used)
    # Train the decoder alone (with `init`): encoder and codebook stay frozen, so the tokens are
    # those of `init` and a transformer trained on them keeps working with the better decoder.
    decoder_only: bool = False


class VQGANTrainer:
    """Owns the models and optimizers of one stage-1 run and performs its steps."""

    def __init__(self, config: VQGANTrainConfig, run: Run, batches):
        self.config = config
        self.run = run
        self.batches = batches  # object with .batch(step, size) -> (inputs, targets)
        self.model = VQGAN(config.model).to(run.device)
        self.use_gan = config.kind == "image"
        self.tokens_from = None
        if config.init:
            self.tokens_from = self._start_from(config.init)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.model_optimizer = torch.optim.Adam(trained, lr=config.lr, betas=(0.5, 0.9))
        if self.use_gan:
            self.perceptual = PerceptualDistance().to(run.device)
            self.discriminator = PatchDiscriminator(
                config.model.out_channels, config.loss.disc_channels, config.loss.disc_layers
            ).to(run.device)
            self.disc_optimizer = torch.optim.Adam(
                self.discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.9)
            )
        self.usage = CodeUsage(config.model.codebook_size, config.usage_window)
        self.recent_latents: list[torch.Tensor] = []
        if run.device.type == "cpu":
            self.model.to(memory_format=torch.channels_last)
        self.step = 0
        self.disc_loss_history: list[float] = []
        self._last_output = None  # the generator's output the discriminator judges next

    def _start_from(self, folder: str) -> str | None:
        """Load `folder`'s weights; with decoder_only, freeze what makes the tokens.

        Returns the token hash the run's checkpoints record (None unless decoder_only).
        """
        checkpoint = load_checkpoint(folder, f"vqgan:{self.config.kind}")
        load_state_strict(self.model, checkpoint.state, folder)
        if not self.config.decoder_only:
            return None
        for part in (self.model.encoder, self.model.quant_conv, self.model.quantizer):
            part.requires_grad_(False)
        return tokens_sha256(checkpoint)

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "model_optimizer": self.model_optimizer.state_dict(),
        }
        if self.use_gan:
            state["discriminator"] = self.discriminator.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        return state

    def load(self, state: dict) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.model_optimizer.load_state_dict(state["model_optimizer"])
        if self.use_gan:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])

    # ------------------------------------------------------------------ losses

    def reconstruction_loss(self, output, target) -> tuple[torch.Tensor, dict]:
        kind = self.config.kind
        if kind == "layout":  # one-hot in, class ids out: cross-entropy as in the paper
            loss = F.cross_entropy(output.float(), target)
            return loss, {"ce": loss.item()}
        error = (output.float() - target).abs()
        if kind == "edges":  # edges are sparse: weigh the stroke pixels up so they are kept
            error = error * (1.0 + 9.0 * (target > 0).float())
        l1 = error.mean()
        if not self.use_gan:
            return l1, {"l1": l1.item()}
        perceptual = self.perceptual(output.float(), target).mean()
        loss = l1 + self.config.loss.perceptual_weight * perceptual
        return loss, {"l1": l1.item(), "perceptual": perceptual.item()}

    def generator_step(self, inputs, target) -> dict:
        config = self.config
        with self.run.autocast():
            output, quantized = self.model(inputs)
        rec_loss, metrics = self.reconstruction_loss(output, target)
        loss = rec_loss + quantized.loss
        gan_active = self.use_gan and self.step >= config.loss.gan_start
        if gan_active:
            with self.run.autocast():
                logits_fake = self.discriminator(output)
            gan_loss = -logits_fake.float().mean()
            weight = adaptive_gan_weight(rec_loss, gan_loss, self.model.last_layer())
            loss = loss + config.loss.disc_weight * weight * gan_loss
            metrics.update(gan_g=gan_loss.item(), adaptive_weight=weight.item())
        metrics.update(
            vq=quantized.loss.item(),
            codebook=quantized.codebook_loss.item(),
            commitment=quantized.commitment_loss.item(),
        )
        if not self.run.check_finite(loss, self.step, "a learning rate too high for this batch"):
            self.model_optimizer.zero_grad(set_to_none=True)
            self._last_output = None  # the discriminator skips this step too
            return metrics
        self.model_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.model.parameters(), self.run.dist)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.model_optimizer.step()
        self._track_codes(quantized.indices, inputs)
        metrics["loss"] = loss.item()
        self._last_output = output.detach()
        return metrics

    def discriminator_step(self, target) -> dict:
        if not self.use_gan or self.step < self.config.loss.disc_start:
            return {}
        if self._last_output is None:
            return {}
        with self.run.autocast():
            logits_real = self.discriminator(target)
            logits_fake = self.discriminator(self._last_output)
        loss = hinge_d_loss(logits_real.float(), logits_fake.float())
        if not self.run.check_finite(loss, self.step, "the discriminator learning rate"):
            return {}
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.discriminator.parameters(), self.run.dist)
        self.disc_optimizer.step()
        self.disc_loss_history = (self.disc_loss_history + [loss.item()])[-200:]
        return {
            "d_loss": loss.item(),
            "logits_real": logits_real.detach().float().mean().item(),
            "logits_fake": logits_fake.detach().float().mean().item(),
        }

    # ------------------------------------------------------------------ codebook

    @torch.no_grad()
    def _track_codes(self, indices: torch.Tensor, inputs: torch.Tensor) -> None:
        counts = torch.bincount(indices.flatten(), minlength=self.config.model.codebook_size)
        all_reduce_sum_(counts, self.run.dist)
        self.usage.history = (self.usage.history + [counts.cpu()])[-self.usage.window :]
        restarts = self.config.restart_every and not self.config.decoder_only  # frozen codebook
        if restarts and self.step % self.config.restart_every == 0:
            with self.run.autocast():
                latent = self.model.encode_latent(inputs).float()
            if self.config.model.l2_normalized:
                latent = F.normalize(latent, dim=1)
            flat = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
            self.recent_latents = (self.recent_latents + [flat.cpu()])[-8:]
            self._restart_dead_codes()

    @torch.no_grad()
    def _restart_dead_codes(self) -> None:
        if len(self.usage.history) < self.usage.window:
            return
        weight = self.model.quantizer.codebook.weight
        if self.run.dist.is_main:
            generator = torch.Generator().manual_seed(self.config.run.seed + self.step)
            recent = torch.cat(self.recent_latents)
            restarted = self.model.quantizer.restart(self.usage.dead(), recent, generator)
            if restarted:
                logger.info("step %d: restarted %d dead codebook entries", self.step, restarted)
        broadcast_(weight.data, self.run.dist)  # rank 0 decided; everyone takes its codebook

    # ------------------------------------------------------------------ the loop

    def train_step(self) -> dict:
        inputs, target = self.batches.batch(self.step, self.config.run.batch_size)
        inputs, target = inputs.to(self.run.device), target.to(self.run.device)
        if self.run.device.type == "cpu" and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        lr = cosine_lr(self.step, self.config.lr, self.config.warmup, self.config.run.steps)
        for group in self.model_optimizer.param_groups:
            group["lr"] = lr
        metrics = self.generator_step(inputs, target)
        metrics.update(self.discriminator_step(target))
        metrics.update(lr=lr, usage=self.usage.usage(), perplexity=self.usage.perplexity())
        self._sample_inputs = (inputs, target)
        self.step += 1
        return metrics

    def collapse_warning(self) -> str | None:
        """A message when the discriminator's loss has sat at 1.0 (it learns nothing)."""
        history = self.disc_loss_history
        if len(history) >= 200 and abs(float(np.mean(history)) - 1.0) < 0.01:
            return (
                "the discriminator's loss has stayed at 1.0 for 200 steps: it cannot tell real "
                "from fake (collapsed); lower disc_lr or start it later"
            )
        return None


def save_sample_grid(trainer: VQGANTrainer, path, display) -> None:
    """A PNG with rows of input | reconstruction."""
    inputs, target = trainer._sample_inputs
    trainer.model.eval()
    with torch.no_grad(), trainer.run.autocast():
        output, _ = trainer.model(inputs[:4])
    trainer.model.train()
    left, right = display(target[:4]), display(output.float()[:4])
    rows = [np.concatenate([a, b], axis=1) for a, b in zip(left, right, strict=True)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def image_display(batch: torch.Tensor) -> np.ndarray:
    return to_uint8(batch)


def resolve_init(config: VQGANTrainConfig) -> None:
    """Check `init` / `decoder_only` and take the model's shape from `init` (before any data)."""
    if config.decoder_only and not config.init:
        raise ConfigError("decoder_only=true needs init=FOLDER: the VQGAN whose decoder to train")
    if config.init:  # the model is the one being continued, whatever the config file says
        try:
            start = load_checkpoint(config.init, f"vqgan:{config.kind}")
        except CheckpointError as error:
            raise ConfigError(f"config key 'init': {error}") from None
        config.model = config_from_dict(VQGANConfig, start.model, f"{config.init}/config.yaml")


def train_vqgan(config: VQGANTrainConfig, batches, resume: bool, card_text, display=image_display):
    """Run (or resume) one stage-1 training run; returns the checkpoint folder."""
    resolve_init(config)
    run = Run(config.run, f"vqgan:{config.kind}", config_to_yaml(config))
    trainer = VQGANTrainer(config, run, batches)
    if resume:
        state = run.load_state()
        if state is None:
            logger.warning("no state in %s; starting from step 0", run.folder)
        else:
            trainer.load(state)
            logger.info("resumed %s at step %d", run.folder, trainer.step)
    broadcast_module_(trainer.model, run.dist)  # every rank starts from rank 0's weights
    if trainer.use_gan:
        broadcast_module_(trainer.discriminator, run.dist)
    checkpoint_folder = run.folder / "checkpoint"

    def save() -> None:
        run.save_state(trainer.state())
        if run.dist.is_main:
            extra = {"step": trainer.step, "stage_kind": config.kind}
            if trainer.tokens_from:
                extra["tokens_from"] = trainer.tokens_from
            save_checkpoint(
                checkpoint_folder,
                f"vqgan:{config.kind}",
                config.model,
                trainer.model.state_dict(),
                card_text(trainer),
                extra=extra,
            )

    bar = run.progress(trainer.step)
    throughput_start, throughput_step = time.monotonic(), trainer.step
    try:
        while trainer.step < config.run.steps:
            metrics = trainer.train_step()
            bar.update(1)
            if trainer.step % config.run.log_every == 0:
                elapsed = time.monotonic() - throughput_start
                images = (trainer.step - throughput_step) * config.run.batch_size
                metrics["images_per_s"] = images * run.dist.world / max(elapsed, 1e-9)
                throughput_start, throughput_step = time.monotonic(), trainer.step
                run.log(trainer.step, metrics)
                bar.set_postfix(
                    loss=f"{metrics.get('loss', float('nan')):.3f}",
                    usage=f"{metrics['usage']:.2f}",
                )
                warning = trainer.collapse_warning()
                if warning:
                    logger.warning(warning)
            if run.dist.is_main and trainer.step % config.run.sample_every == 0:
                save_sample_grid(
                    trainer, run.folder / "samples" / f"{trainer.step:07d}.png", display
                )
            if run.due_for_save():
                save()
            if run.out_of_time():
                break
        save()
    except TrainingError:
        raise
    finally:
        bar.close()
        run.close()
    return checkpoint_folder
