"""Option sections shared by the training stages (UNet / upscaler and autoencoder), defined once.

Each section is a dataclass mixin deriving from `StageConfig` with its own `validate()` that
calls `super().validate()`; a stage config mixes the sections in (torchtitan-style) and keeps
its flat command-line flags. A stage whose default differs redeclares that one field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from latentforge.config import ConfigError, StageConfig


@dataclass
class OptimizerOptions(StageConfig):
    """AdamW and its LR schedule (linear warm-up, then cosine decay to a floor)."""

    lr: float = 1e-4
    """Peak learning rate (AdamW), reached after warmup_steps, then cosine decay."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear LR warm-up steps, then cosine decay to min_lr_ratio * lr at `steps`."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine decay, as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; the norm is logged either way)."""

    def validate(self) -> None:
        super().validate()
        self.check_positive("lr")
        self.check_at_least(0, "weight_decay", "warmup_steps", "grad_clip")
        self.check_fraction("min_lr_ratio")


@dataclass
class ClusterOptions(StageConfig):
    """The Ray Train worker group, where its run lives and how often it may restart."""

    num_workers: int = 1
    """Ray Train workers (one per GPU with --use-gpu)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement strategy for the workers."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Accelerate mixed precision: bf16 (GPU or CPU), fp16 (GPU only, with loss scaling) or no."""
    storage_path: str = "train_runs"
    """Where checkpoints and the export go: a local dir (single node, or shared) or an fsspec URI."""
    storage_is_shared: bool = False
    """Declare a local storage_path to be a shared filesystem mounted on every node (multi-node)."""
    run_name: str = ""
    """Run name (STORAGE/RUN_NAME); rerunning with the same name resumes. Empty = train-<timestamp>."""
    max_failures: int = 2
    """Worker-group restarts (from the last checkpoint) before the run fails."""

    def validate(self) -> None:
        super().validate()
        self.check_at_least(1, "num_workers")
        self.check_positive("cpus_per_worker")
        self.check_at_least(0, "max_failures")
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ConfigError("mixed_precision fp16 needs --use-gpu (use bf16 or no on CPU)")


@dataclass
class CheckpointOptions(StageConfig):
    """How often a run checkpoints and reports, and how many checkpoints it keeps."""

    checkpoint_every: int = 500
    """Checkpoint every N steps (a final checkpoint is always written)."""
    keep_checkpoints: int = 3
    """Keep the last K checkpoints."""
    log_every: int = 10
    """Progress line on rank 0 every N steps; loss, lr, grad norm, samples/s and step time go to MLflow
    every step, the data-wait share, memory, skipped steps and epoch once per N-step window."""

    def validate(self) -> None:
        super().validate()
        self.check_at_least(1, "checkpoint_every", "keep_checkpoints", "log_every")
