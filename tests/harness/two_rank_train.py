"""`DiffusionTrainer.train_step` on two real ranks: torch.distributed (gloo, localhost) in two spawned
processes, each with Accelerate's own multi-CPU set-up, as Ray Train workers would run it.

The trainer draws noise and timesteps from one generator per rank, so a batch split over ranks
and micro-batches sees other noise than the same batch on one rank. To compare the two, the
tests swap in `PerSampleNoise`: each sample's noise and timestep are seeded by its latent's
bytes, so a sample gets the same draw wherever it lands.
"""

from __future__ import annotations

import json
import os
import socket
import zlib
from pathlib import Path
from typing import Any

import torch

from latentforge.diffusion import objective


class PerSampleNoise:
    """Stand-ins for `objective.sample_noise` / `sample_timesteps` (called in that order per batch)."""

    def __init__(self) -> None:
        self._seeds: list[int] = []

    def noise(self, latents: torch.Tensor, generator: torch.Generator, offset_noise: float = 0.0) -> torch.Tensor:
        self._seeds = [zlib.crc32(row.contiguous().numpy().tobytes()) for row in latents]
        return torch.stack([torch.randn(row.shape, generator=torch.Generator().manual_seed(seed), dtype=row.dtype)
                            for row, seed in zip(latents, self._seeds)])

    def timesteps(self, batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        assert batch == len(self._seeds), "sample_timesteps without a matching sample_noise"
        return torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=torch.Generator().manual_seed(s + 1))
                          for s in self._seeds])

    def install(self, setattr_: Any = setattr) -> None:
        setattr_(objective, "sample_noise", self.noise)
        setattr_(objective, "sample_timesteps", self.timesteps)


def slice_batch(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows [start, stop) of a collated batch (same padded text length)."""
    return {k: v[start:stop] for k, v in batch.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, steps_per_rank: list[list[list[dict[str, Any]]]], config: Any,
               unet_config: dict[str, Any], empty_text: torch.Tensor, out: str) -> None:
    """One rank: Accelerate reads the torchrun-style environment and starts gloo itself."""
    world, steps = len(steps_per_rank), steps_per_rank[rank]
    from accelerate import Accelerator

    from latentforge.training.loop import DiffusionTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    PerSampleNoise().install()
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world, accelerator.state
    trainer = DiffusionTrainer(config, unet_config, accelerator, empty_text, "mean", rank)
    results = [vars(trainer.train_step(micro_batches)) for micro_batches in steps]
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in trainer.raw_model.state_dict().items()}, f"{out}/weights.safetensors")
        Path(out, "results.json").write_text(json.dumps(results))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def train_on_two_ranks(steps_per_rank: list[list[list[dict[str, Any]]]], config: Any, unet_config: dict[str, Any],
                       empty_text: torch.Tensor, out: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """steps_per_rank[rank][step] = that rank's micro-batches; returns rank 0's weights and step results."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mp.start_processes(_rank_main, args=(port, steps_per_rank, config, unet_config, empty_text, str(out)),
                       nprocs=len(steps_per_rank), join=True, start_method="spawn")
    return load_file(str(out / "weights.safetensors")), json.loads((out / "results.json").read_text())

