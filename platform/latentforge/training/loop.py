"""The Accelerate training step for a latent UNet, usable inside Ray Train workers or alone.

`DiffusionTrainer` owns the model, AdamW, the warm-up + cosine LR schedule, the EMA weights, the
noise schedule and one explicit random generator (timesteps, noise, offset noise, caption
dropout and posterior sampling all draw from it, so a checkpoint that saves its state makes the
next step bit-identical). A step whose loss or gradient norm is not finite is skipped on every
rank alike (the optimizer, LR schedule and EMA do not move), counted, and never checkpointed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from latentforge.conditioning.embedding import class_labels, condition_dropout
from latentforge.conditioning.spec import ConditionSet
from latentforge.diffusion import objective
from latentforge.diffusion.schedulers import make_scheduler
from latentforge.models.unet import unet_from_config
from latentforge.training import checkpoint as ckpt
from latentforge.training.config import TrainConfig
from latentforge.upscaler.conditioning import TrainingCondition

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: int
    """Optimizer steps taken so far (including this one, skipped or not)."""
    loss: float
    """This rank's loss (mean over its micro-batches)."""
    global_loss: float
    """Loss averaged over all ranks."""
    grad_norm: float
    lr: float
    skipped: bool
    seconds: float


class CheckpointPolicy:
    """Checkpoint every `every` steps and at the last step, but never right after a skipped step.

    A due checkpoint whose step was skipped (non-finite loss) is postponed to the next good step.
    """

    def __init__(self, every: int, total_steps: int) -> None:
        self.every, self.total_steps, self.pending = every, total_steps, False

    def should_save(self, step: int, skipped: bool) -> bool:
        if not (step % self.every == 0 or step == self.total_steps or self.pending):
            return False
        self.pending = skipped
        return not skipped


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_adamw(params: Sequence[torch.nn.Parameter], config: TrainConfig, device: torch.device):
    """Fused AdamW when this torch/device supports it, else foreach (said once in the log)."""
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                  weight_decay=config.weight_decay)
    try:
        opt = torch.optim.AdamW(params, fused=True, **kwargs)
        return opt, "fused"
    except (RuntimeError, TypeError, ValueError) as exc:
        log.warning("fused AdamW is not available on %s (%s); using the foreach implementation", device, exc)
        return torch.optim.AdamW(params, foreach=True, **kwargs), "foreach"


class DiffusionTrainer:
    def __init__(self, config: TrainConfig, unet_config: dict[str, Any], accelerator: Any,
                 empty_text: torch.Tensor, latent_kind: str = "mean", rank: int = 0,
                 conditions: ConditionSet | None = None) -> None:
        from diffusers.training_utils import EMAModel

        self.config = config
        self.unet_config = dict(unet_config)
        self.accelerator = accelerator
        self.device = accelerator.device
        self.rank = rank
        self.latent_kind = latent_kind
        self.conditions = conditions or ConditionSet()
        self.empty_text = empty_text.to(self.device)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        model = unet_from_config(self.unet_config)
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.to(self.device)
        model.train()
        optimizer, self.optimizer_kind = make_adamw(list(model.parameters()), config, self.device)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if accelerator.num_processes == 1 and isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            # Inside Ray Train a 1-worker run still has a process group, so Accelerate wraps the
            # model in DDP; with no peer its gradient buckets and hooks are pure cost (~1 % here).
            self.model = self.model.module
        # Not prepared: Accelerate would step it once per process; we step it once per optimizer step.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            lambda s: warmup_cosine(s, config.warmup_steps, config.steps, config.min_lr_ratio))
        self.ema = EMAModel(self.raw_model.parameters(), decay=config.ema_decay) if config.ema_decay > 0 else None
        if self.ema is not None:
            self.ema.to(self.device)
        self.noise_scheduler = make_scheduler("ddpm", beta_schedule=config.beta_schedule,
                                              prediction_type=config.prediction_type,
                                              num_train_timesteps=config.num_train_timesteps)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed * 1_000_003 + 7919 * (rank + 1))
        self.image_condition = TrainingCondition(config.max_noise_level) if config.stage == "upscaler" else None
        self.step = 0
        self.skipped_steps = 0
        self.samples_seen = 0

    @property
    def raw_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # -- objective -----------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any], model: torch.nn.Module | None = None,
                     generator: torch.Generator | None = None, cfg_dropout: float | None = None) -> torch.Tensor:
        gen = generator or self.generator
        model = model or self.model
        latents = batch["latents"].to(self.device, non_blocking=True)
        if self.latent_kind == "mean_std":
            latents = objective.sample_posterior(latents, gen)  # (B,2,C,h,w) -> (B,C,h,w)
        text = batch["text"].to(self.device, non_blocking=True)  # (B,L,D)
        mask = batch["mask"].to(self.device, non_blocking=True)  # (B,L)
        p = self.config.cfg_dropout if cfg_dropout is None else cfg_dropout
        if p > 0:
            text, mask, _ = objective.caption_dropout(text, mask, self.empty_text, p, gen)
        labels = self.class_labels(batch, gen, self.config.condition_dropout if cfg_dropout is None else 0.0)
        noise = objective.sample_noise(latents, gen, self.config.offset_noise)
        timesteps = objective.sample_timesteps(latents.shape[0], self.config.num_train_timesteps, gen)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.image_condition is not None:  # upscaler: + the augmented low-res image, its noise level as label
            noisy, labels = self.image_condition.model_input(noisy, batch["lowres"], gen)
        target = objective.training_target(self.noise_scheduler, latents, noise, timesteps)
        with self.accelerator.autocast():
            pred = model(noisy, timesteps, encoder_hidden_states=text, encoder_attention_mask=mask,
                         class_labels=labels).sample
        weights = None
        if self.config.snr_gamma > 0:
            weights = objective.min_snr_weights(objective.snr(self.noise_scheduler, timesteps),
                                                self.config.snr_gamma, self.config.prediction_type)
        return objective.weighted_mse(pred, target, weights)

    def class_labels(self, batch: dict[str, Any], gen: torch.Generator, dropout: float) -> torch.Tensor | None:
        """The UNet's class_labels from the batch's conditions (None without any), a fraction `dropout`
        of the samples set to the null condition by a draw of its own (independent of caption dropout)."""
        if not self.conditions:
            return None
        rows = self.conditions.rows(batch["conditions"]).to(self.device)  # (B, N)
        if dropout > 0:
            rows, _ = condition_dropout(self.conditions, rows, dropout, gen)
        return class_labels(self.conditions, rows)

    # -- one optimizer step ----------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[dict[str, Any]]) -> StepResult:
        start = time.perf_counter()
        acc = self.accelerator
        n = len(micro_batches)
        losses = []
        for i, batch in enumerate(micro_batches):
            sync = i == n - 1
            ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(self.model)
            with ctx:
                loss = self.compute_loss(batch)
                acc.backward(loss / n)
            losses.append(loss.detach().float())
        local = torch.stack(losses).mean()
        flags = torch.stack([local, (~torch.isfinite(local)).float()]).to(self.device)
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        any_bad = bool(flags[1] > 0)
        global_loss = float(flags[0]) / acc.num_processes
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        lr = self.lr_scheduler.get_last_lr()[0]
        skipped = any_bad or not math.isfinite(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            if getattr(acc, "scaler", None) is not None:
                acc.scaler.update()
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss/grad norm (loss %s, grad norm %s); step skipped (%d so far)",
                        self.step + 1, global_loss, grad_norm, self.skipped_steps)
        else:
            self.optimizer.step()
            if getattr(self.optimizer, "step_was_skipped", False):  # fp16 loss-scale overflow
                skipped = True
                self.skipped_steps += 1
            else:
                self.lr_scheduler.step()
                if self.ema is not None:
                    self.ema.step(self.raw_model.parameters())
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += sum(b["latents"].shape[0] for b in micro_batches) * acc.num_processes
        return StepResult(step=self.step, loss=float(local), global_loss=global_loss, grad_norm=grad_norm, lr=lr,
                          skipped=skipped, seconds=time.perf_counter() - start)

    # -- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, batches: Sequence[dict[str, Any]], use_ema: bool = False) -> float:
        """Mean loss over fixed held-out batches with fixed noise/timesteps (comparable across steps)."""
        if not batches:
            return float("nan")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.config.seed + 424242)
        with self.ema_weights() if use_ema else contextlib.nullcontext():
            model = self.raw_model
            model.eval()
            try:
                losses = [float(self.compute_loss(b, model=model, generator=gen, cfg_dropout=0.0)) for b in batches]
            finally:
                model.train()
        return float(np.mean(losses))

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily swap the EMA weights into the (unwrapped) model on this rank."""
        if self.ema is None:
            yield self.raw_model
            return
        params = list(self.raw_model.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield self.raw_model
        finally:
            self.ema.restore(params)

    def export_model(self) -> torch.nn.Module:
        """A CPU float32 UNet holding the EMA weights (raw weights without EMA)."""
        model = unet_from_config(self.unet_config)
        if self.ema is not None:
            self.ema.copy_to(model.parameters())
        else:
            model.load_state_dict({k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()})
        return model.eval()

    # -- checkpoints -----------------------------------------------------------------------------
    def rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "generator": self.generator.get_state(),
            "torch_cpu": torch.get_rng_state(),
            "python": list(random.getstate()[1]) + [random.getstate()[0]],
        }
        np_state = np.random.get_state()
        state["numpy"] = {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                          "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}
        if torch.cuda.is_available() and self.device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())
        torch.set_rng_state(state["torch_cpu"].to(torch.uint8).cpu())
        py = state["python"]
        random.setstate((py[-1], tuple(py[:-1]), None))
        npst = state["numpy"]
        np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                             npst["gauss"]))
        if "torch_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["torch_cuda"].to(torch.uint8).cpu(), self.device)

    def save(self, directory: str, extra: dict[str, Any], write_shared: bool = True) -> None:
        """Write this rank's RNG part; with `write_shared` (rank 0) also model/EMA/optimizer/trainer."""
        ckpt.write_part(directory, f"rng_rank{self.rank}", self.rng_state())
        if not write_shared:
            return
        ckpt.write_part(directory, "model", self.raw_model.state_dict())
        if self.ema is not None:
            ckpt.write_part(directory, "ema", self.ema.state_dict())
        ckpt.write_part(directory, "optimizer", self.optimizer.state_dict())
        trainer_state = {
            "step": self.step, "skipped_steps": self.skipped_steps, "samples_seen": self.samples_seen,
            "lr_scheduler": self.lr_scheduler.state_dict(), "unet_config": self.unet_config,
            "optimizer_kind": self.optimizer_kind, **extra,
        }
        ckpt.write_part(directory, "trainer", trainer_state)

    def load(self, directory: str) -> dict[str, Any]:
        """Restore everything from a checkpoint; returns the trainer part (step, data position, ...)."""
        trainer_state = ckpt.read_part(directory, "trainer")
        self.raw_model.load_state_dict(ckpt.read_part(directory, "model", device=self.device))
        if self.ema is not None:
            if not ckpt.has_part(directory, "ema"):
                raise ckpt.CheckpointError(f"{directory} has no EMA weights but this run uses ema_decay > 0")
            self.ema.load_state_dict(ckpt.read_part(directory, "ema"))
            self.ema.to(self.device)
        self.optimizer.load_state_dict(ckpt.read_part(directory, "optimizer", device=self.device))
        self.lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
        rng_part = f"rng_rank{self.rank}"
        if not ckpt.has_part(directory, rng_part):
            raise ckpt.CheckpointError(f"{directory} has no RNG state for rank {self.rank} (was it written by a run "
                                       "with fewer workers?)")
        self.set_rng_state(ckpt.read_part(directory, rng_part))
        self.step = int(trainer_state["step"])
        self.skipped_steps = int(trainer_state["skipped_steps"])
        self.samples_seen = int(trainer_state["samples_seen"])
        return trainer_state
