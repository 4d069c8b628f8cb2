"""The Accelerate training step for a diffusers AutoencoderKL, usable inside Ray Train workers or alone.

`AutoencoderTrainer` owns the model, AdamW (the train stage's `make_adamw`), the warm-up + cosine
LR schedule (`warmup_cosine`), the loss and one explicit generator for posterior samples. A step
whose loss or gradient norm is not finite on any rank is skipped on every rank alike and counted,
like the UNet trainer's. Checkpoints are the train stage's safetensors + JSON parts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import numpy as np
import torch

from latentforge.autoencoder.config import AutoencoderTrainConfig
from latentforge.autoencoder.losses import AutoencoderLoss, PatchDiscriminator, discriminator_loss
from latentforge.pixels import to_pixels
from latentforge.training import checkpoint as ckpt
from latentforge.training.loop import StepResult, make_adamw, warmup_cosine

log = logging.getLogger(__name__)


def build_autoencoder(config: AutoencoderTrainConfig) -> Any:
    """A fresh AutoencoderKL from the config's architecture, or the `init` directory's (safetensors only)."""
    from diffusers import AutoencoderKL

    if config.init:
        return AutoencoderKL.from_pretrained(config.init, use_safetensors=True, torch_dtype=torch.float32)
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups, sample_size=config.resolution)


class EncodeDecode(torch.nn.Module):
    """encode -> (sample | mean) -> decode as ONE forward, so DDP sees the whole graph and syncs its gradients."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels (B, 3, H, W) in [-1, 1] -> (reconstruction (B, 3, H, W), mean, logvar (B, C, h, w))."""
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        return self.vae.decode(latents).sample, posterior.mean, posterior.logvar


class AutoencoderTrainer:
    """One rank's AutoencoderKL (wrapped for DDP by Accelerate), its optimiser, schedule and loss."""

    def __init__(self, config: AutoencoderTrainConfig, accelerator: Any, rank: int = 0) -> None:
        self.config, self.accelerator, self.rank = config, accelerator, rank
        self.device = accelerator.device
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        module = EncodeDecode(build_autoencoder(config)).to(self.device).train()
        optimizer, self.optimizer_kind = make_adamw(list(module.parameters()), config, self.device)
        self.model, self.optimizer = self._prepare(module, optimizer)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            getattr(self.optimizer, "optimizer", self.optimizer),
            lambda s: warmup_cosine(s, config.warmup_steps, config.steps, config.min_lr_ratio))
        self.loss = AutoencoderLoss(config, self.device)
        self.discriminator = self.disc_optimizer = None
        if config.discriminator:
            self._build_discriminator()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed * 1_000_003 + 7919 * (rank + 1))
        self.step = self.skipped_steps = self.samples_seen = 0
        self.last_terms: dict[str, float] = {}

    def _prepare(self, module: torch.nn.Module, optimizer: Any) -> tuple[torch.nn.Module, Any]:
        model, optimizer = self.accelerator.prepare(module, optimizer)
        if self.accelerator.num_processes == 1 and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # a 1-worker Ray Train group needs no gradient buckets
        return model, optimizer

    def _build_discriminator(self) -> None:
        config = self.config
        module = PatchDiscriminator(config.disc_layers, config.disc_channels).to(self.device).train()
        optimizer, _ = make_adamw(list(module.parameters()), config, self.device)
        for group in optimizer.param_groups:
            group["lr"] = config.disc_lr or config.lr
        self.discriminator, self.disc_optimizer = self._prepare(module, optimizer)
        self.disc_scheduler = torch.optim.lr_scheduler.LambdaLR(
            getattr(self.disc_optimizer, "optimizer", self.disc_optimizer),
            lambda s: warmup_cosine(s, config.warmup_steps, config.steps, config.min_lr_ratio))

    @property
    def adversarial(self) -> bool:
        """Whether the discriminator trains (and its term counts) at this step."""
        return self.discriminator is not None and self.step >= self.config.disc_start

    @property
    def vae(self) -> Any:
        """The diffusers AutoencoderKL being trained (unwrapped)."""
        return self.accelerator.unwrap_model(self.model).vae

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] on this device (precompute's conversion)."""
        return to_pixels(images).to(self.device, non_blocking=True)

    def train_step(self, images: np.ndarray) -> StepResult:
        start, acc = time.perf_counter(), self.accelerator
        pixels = self.pixels(images)
        with acc.autocast():
            reconstruction, mean, logvar = self.model(pixels, self.generator, self.config.sample_posterior)
        terms = self.loss(pixels, reconstruction, mean, logvar)
        if self.adversarial:
            terms["g_adv"] = self._generator_adversarial(reconstruction)
            terms["total"] = terms["total"] + self.config.disc_weight * terms["g_adv"]
        acc.backward(terms["total"])
        local = terms["total"].detach().float()
        flags = torch.stack([local, (~torch.isfinite(local)).float()])
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), max_norm))
        lr = self.lr_scheduler.get_last_lr()[0]
        skipped = bool(flags[1] > 0) or not math.isfinite(grad_norm)
        self._apply(skipped)
        if self.adversarial and not skipped:
            terms["d_loss"] = self._discriminator_step(pixels, reconstruction.detach())
        self.step += 1
        self.samples_seen += len(images) * acc.num_processes
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return StepResult(step=self.step, loss=float(local), global_loss=float(flags[0]) / acc.num_processes,
                          grad_norm=grad_norm, lr=lr, skipped=skipped, seconds=time.perf_counter() - start)

    def _apply(self, skipped: bool) -> None:
        """Optimizer + LR step, or (non-finite loss/gradients on any rank) a counted skip."""
        if skipped:
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient norm; step skipped (%d so far)", self.step + 1,
                        self.skipped_steps)
        else:
            self.optimizer.step()
            if getattr(self.optimizer, "step_was_skipped", False):  # fp16 loss-scale overflow
                self.skipped_steps += 1
            else:
                self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _generator_adversarial(self, reconstruction: torch.Tensor) -> torch.Tensor:
        """-mean D(x'): gradients reach the autoencoder only (D is frozen for this forward)."""
        critic = self.accelerator.unwrap_model(self.discriminator)
        critic.requires_grad_(False)
        try:
            return -critic(reconstruction.float()).mean()
        finally:
            critic.requires_grad_(True)

    def _discriminator_step(self, pixels: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One hinge-loss step of D on real images and detached reconstructions (one forward, for DDP)."""
        real_logits, fake_logits = self.discriminator(torch.cat([pixels, fake.float()])).chunk(2)
        loss = discriminator_loss(real_logits, fake_logits)
        self.accelerator.backward(loss)
        # The norm of the all-reduced gradients is the same on every rank, so all ranks step or skip together.
        grad_norm = self.accelerator.clip_grad_norm_(self.discriminator.parameters(), float("inf"))
        if math.isfinite(float(grad_norm)):
            self.disc_optimizer.step()
            self.disc_scheduler.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels, reconstructions from the posterior mean), both (N, 3, H, W) in [-1, 1] on the CPU."""
        module = self.accelerator.unwrap_model(self.model)
        pixels, outs = self.pixels(images), []
        with self._eval_mode(module):
            for i in range(0, len(pixels), batch_size):
                outs.append(module(pixels[i:i + batch_size], sample=False)[0].float().clamp(-1, 1))
        return pixels.cpu(), torch.cat(outs).cpu()

    @contextlib.contextmanager
    def _eval_mode(self, module: torch.nn.Module):
        module.eval()
        try:
            yield
        finally:
            module.train()

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, directory: str, extra: dict[str, Any], rank_state: dict[str, Any],
             write_shared: bool = True) -> None:
        """This rank's part (generator, `rank_state` such as the data position); on rank 0 the shared parts."""
        ckpt.write_part(directory, f"rank{self.rank}", {"generator": self.generator.get_state(), **rank_state})
        if not write_shared:
            return
        ckpt.write_part(directory, "model", self.vae.state_dict())
        ckpt.write_part(directory, "optimizer", self.optimizer.state_dict())
        if self.discriminator is not None:
            ckpt.write_part(directory, "discriminator", {
                "model": self.accelerator.unwrap_model(self.discriminator).state_dict(),
                "optimizer": self.disc_optimizer.state_dict(), "lr_scheduler": self.disc_scheduler.state_dict()})
        ckpt.write_part(directory, "trainer", {
            "step": self.step, "skipped_steps": self.skipped_steps, "samples_seen": self.samples_seen,
            "lr_scheduler": self.lr_scheduler.state_dict(), "optimizer_kind": self.optimizer_kind, **extra})

    def load(self, directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore weights, optimizer, schedule, counters and generator: (trainer part, this rank's part)."""
        trainer_state = ckpt.read_part(directory, "trainer")
        part = f"rank{self.rank}"
        if not ckpt.has_part(directory, part):
            raise ckpt.CheckpointError(f"{directory} has no state for rank {self.rank} (was it written by a run "
                                       "with fewer workers?)")
        rank_state = ckpt.read_part(directory, part)
        self.vae.load_state_dict(ckpt.read_part(directory, "model", device=self.device))
        self.optimizer.load_state_dict(ckpt.read_part(directory, "optimizer", device=self.device))
        self.lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
        if self.discriminator is not None:
            self._load_discriminator(directory)
        self.generator.set_state(rank_state.pop("generator").to(torch.uint8).cpu())
        self.step = int(trainer_state["step"])
        self.skipped_steps = int(trainer_state["skipped_steps"])
        self.samples_seen = int(trainer_state["samples_seen"])
        return trainer_state, rank_state

    def _load_discriminator(self, directory: str) -> None:
        if not ckpt.has_part(directory, "discriminator"):
            raise ckpt.CheckpointError(f"{directory} has no discriminator but this run uses --discriminator")
        state = ckpt.read_part(directory, "discriminator", device=self.device)
        self.accelerator.unwrap_model(self.discriminator).load_state_dict(state["model"])
        self.disc_optimizer.load_state_dict(state["optimizer"])
        self.disc_scheduler.load_state_dict(state["lr_scheduler"])
