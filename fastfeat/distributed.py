"""torchrun support: process group set-up, row sharding and reductions.

A plain run (no torchrun, no WORLD_SIZE) is a world of one and never touches torch.distributed.
Backend: nccl when the ranks run on GPUs, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .runtime import image_device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0: the process that prints and writes reports."""
    return int(os.environ.get("RANK", "0")) == 0


def init_world(device_name: str = "auto") -> tuple[World, torch.device]:
    """Join torchrun's process group when launched by it; each rank gets its own GPU (LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), image_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device_name = f"cuda:{local_rank}"
    device = image_device(device_name)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank), device


def shard_range(n: int, world: World) -> tuple[int, int]:
    """Rank's contiguous slice of n rows (the first n % size ranks take one more)."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise sum over ranks (nccl reduces on the rank's GPU, gloo on the CPU)."""
    if not world.distributed:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = values.to(device, copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
