"""How much memory a command may hold features in: `--memory-budget` (parsed where it is declared), or a safe
share of what the device has free, and the block size a streamed pass reads under it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .settings import GPU_SHARE, HOST_SHARE

IN_MEMORY_COPIES = 2  # the in-memory path holds the features and about one working copy (standardised, gathered)
HELD_SHARE = 4  # a streamed run with a holdout keeps its held-out rows in memory if they take under 1/4 of the budget


def available_bytes(device: torch.device) -> int:
    """What the device has free: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def memory_budget(budget: int | None, device: torch.device) -> int:
    """The budget in bytes: `budget`, or the device's safe share."""
    if budget is not None:
        return budget
    return int(available_bytes(device) * (GPU_SHARE if device.type == "cuda" else HOST_SHARE))


def block_rows(budget: int, row_bytes: int, held: int = 3) -> int:
    """Rows per block when `held` blocks of `row_bytes` a row exist at once (the one trained on, the one
    being read, and the raw rows it is converted from)."""
    return max(1, budget // (held * row_bytes))


@dataclass(frozen=True)
class StreamPlan:
    """Whether a command's features fit its budget in memory (then nothing changes), and if not, the train
    split's rows per streamed block, and whether rows held out of train for validation stay in memory."""

    budget: int
    need: int
    block_rows: int
    rows: int

    @classmethod
    def for_splits(cls, cache: str, splits: tuple[str, ...], budget: int | None, device: torch.device,
                   views: bool = False, holdout: bool = False) -> StreamPlan:
        """The plan for holding `splits` of `cache` (with their views) as float32 on `device`; with a
        `holdout` of train, a share of the budget is kept for the held-out rows (`holds_in_memory`)."""
        from .cache_file import split_bytes, split_shape

        budget = memory_budget(budget, device)
        need = sum(split_bytes(cache, split, views) for split in splits)
        rows, row_values = split_shape(cache, "train", views)
        others = need - split_bytes(cache, "train", views)  # queries and evaluation splits stay in memory
        others += budget // HELD_SHARE if holdout else 0
        row_bytes = row_values * 4 + 16  # float32 values, and a block row's label and file row (int64 each)
        return cls(budget, need, block_rows(max(budget - others, budget // 4), row_bytes), rows)

    def holds_in_memory(self, held_bytes: int) -> bool:
        """Whether held-out rows of `held_bytes` (float32) fit the budget's share kept for them; if not they
        are read from the file, like train, at every validation."""
        return held_bytes <= self.budget // HELD_SHARE

    @property
    def streams(self) -> bool:
        """Whether the features (with a working copy beside them) exceed the budget."""
        return IN_MEMORY_COPIES * self.need > self.budget

    def describe(self, passes: int | str) -> str:
        blocks = -(-self.rows // self.block_rows)
        return (f"streaming train from the cache: {self.need / 2**20:.0f} MiB of features over a "
                f"{self.budget / 2**20:.0f} MiB --memory-budget, {blocks} blocks of {self.block_rows} rows, "
                f"{passes} pass{'es' if passes != 1 else ''}")
