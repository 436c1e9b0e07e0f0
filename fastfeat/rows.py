"""The train rows a head fits on, in memory (`TensorRows`) or streamed from the cache (`StreamedRows`):
one interface, so `linear.py` and `sweep.py` run the same training code on both.

- `shuffled(batch_size, generator)`: one epoch's mini-batches. In memory, a `torch.randperm` of the rows;
  streamed, a seeded permutation of small contiguous pieces of the file, read a block's worth of pieces at a
  time (each block gathered from all over the file), then one of the rows inside each block, the batches
  carried across block boundaries, so every row is read once per epoch in batches of the in-memory size
  (docs/design.md says how this compares with a full shuffle).
- `passes()`: every row once, in file order, as (x, y) parts (full-batch L-BFGS, train evaluation).
- `stats()`: the per-feature mean and std the head standardises with (of the center crops).
- `start_epoch(epoch)`: the epoch's views of the rows (`views.ViewChoices`), when there are views.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from .cache_file import Block, BlockReader
    from .views import ViewChoices, ViewSampler

Batch = tuple[torch.Tensor, torch.Tensor]


def feature_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (constant features get std 1)."""
    mean, squares = feature_moments(x)
    return mean, safe_std((squares / max(len(x) - 1, 1)).sqrt())


def feature_moments(x: torch.Tensor, rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and sum of squared deviations from it, in two passes over row blocks:
    `torch.std(x, 0)` is much slower on a CPU."""
    mean = x.mean(0)
    squares = torch.zeros_like(mean)
    for block in x.split(rows):
        squares += (block - mean).square().sum(0)
    return mean, squares


def safe_std(std: torch.Tensor) -> torch.Tensor:
    """`std` with (nearly) constant features' std set to 1, so standardising them divides by nothing small."""
    return torch.where(std > 1e-6, std, torch.ones_like(std))


class TensorRows:
    """Rows in memory: `x` (N, D) float32 and `y` (N,), or with a `sampler` each epoch's views of them (its
    buffer). A batch of `shuffled` is valid until the next one is drawn (one reused buffer: a fresh large
    tensor per batch costs page faults that take longer than the whole step on a CPU)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sampler: ViewSampler | None = None):
        self.x, self.y, self.sampler = x, y, sampler
        self.rows, self.dim, self.device = len(y), x.shape[1], x.device

    @property
    def features(self) -> torch.Tensor:
        return self.x if self.sampler is None else self.sampler.buffer

    def start_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.refresh(epoch)

    def shuffled(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        x = self.features
        buffer = x.new_empty(min(batch_size, len(x)), x.shape[1])
        for idx in torch.randperm(len(self.y), generator=generator, device=x.device).split(batch_size):
            yield torch.index_select(x, 0, idx, out=buffer[: len(idx)]), self.y[idx]

    def passes(self) -> Iterator[Batch]:
        yield self.features, self.y

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return feature_stats(self.features)


class StreamedRows:
    """The rows `keep` (sorted file rows; None: all) of a cache split, read block by block by `reader`; `y`
    their labels (8 bytes a row, kept in memory), `sampler` the views each epoch reads (the reader must then
    read views). Statistics come from one pass over the file (`scan`), which also gathers held-out rows.
    Evaluation rows under TTA give `flip`, their flip's view index: `passes` then yields (n, 2, D) center
    and flip pairs."""

    def __init__(self, reader: BlockReader, keep: np.ndarray | None, labels: np.ndarray,
                 sampler: ViewChoices | None = None, flip: int | None = None):
        self.reader, self.sampler, self.flip, self.device, self.dim = reader, sampler, flip, reader.device, reader.dim
        self.mask = (torch.ones(reader.rows, dtype=torch.bool, device=self.device) if keep is None else
                     row_mask(keep, reader.rows, self.device))
        # a file row's place among the kept, which indexes the epoch's view choices
        self.position = None if sampler is None else self.mask.cumsum(0) - 1
        self.y = torch.from_numpy(labels).to(self.device)[self.mask]
        self.rows = len(self.y)
        self.choice: torch.Tensor | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def start_epoch(self, epoch: int) -> None:
        self.choice = None if self.sampler is None else self.sampler.read(epoch)

    def shuffled(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Batches carried across blocks, each valid until the next is drawn (one reused buffer, as in memory)."""
        reader = self.reader
        pieces, per_block = reader.pieces, reader.pieces_per_block
        order = torch.randperm(len(pieces), generator=generator, device=generator.device).tolist()
        groups = [sorted(pieces[i] for i in order[at:at + per_block]) for at in range(0, len(order), per_block)]
        buffer = torch.empty(min(batch_size, self.rows), self.dim, device=self.device)
        labels: list[torch.Tensor] = []
        filled = 0
        for block in reader.gathered(groups):  # each group's pieces in file order: the reads run forward
            local = self._kept(block)
            local = local[torch.randperm(len(local), generator=generator, device=generator.device)]
            while len(local):
                take, local = local[:batch_size - filled], local[batch_size - filled:]
                self._rows_into(block, take, buffer[filled:filled + len(take)])
                labels.append(block.labels[take])
                filled += len(take)
                if filled == batch_size:
                    yield buffer, torch.cat(labels)
                    labels, filled = [], 0
        if filled:
            yield buffer[:filled], torch.cat(labels)

    def passes(self) -> Iterator[Batch]:
        for block in self.reader.blocks():
            local = self._kept(block)
            if len(local):  # a block of held-out rows only adds nothing (an empty mean would be nan)
                yield self._rows(block, local), block.labels[local]

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stats is None:
            self.scan(None, None)
        return self._stats

    def scan(self, held: np.ndarray | None, flip: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One pass in file order: the kept rows' center statistics (`stats`), and the features (and, with a
        `flip` view index, flips) of the `held` file rows (sorted), which are never among the kept ones."""
        reader = self.reader if flip is None else self.reader.with_views()
        held_mask = None if held is None else row_mask(held, self.reader.rows, self.device)
        stats, features, flips = RunningStats(self.dim, self.device), [], []
        for block in reader.blocks():
            stats.add(block.features[self._kept(block)])
            if held_mask is not None:
                local = block.local(held_mask)
                features.append(block.features[local])
                if flip is not None:
                    flips.append(block.views[local, flip])
        self._stats = stats.result()
        return (torch.cat(features) if held_mask is not None else None), (torch.cat(flips) if flips else None)

    def _kept(self, block: Block) -> torch.Tensor:
        return block.local(self.mask)

    def _rows_into(self, block: Block, local: torch.Tensor, out: torch.Tensor) -> None:
        if self.choice is None:
            torch.index_select(block.features, 0, local, out=out)
        else:
            out.copy_(self._rows(block, local))

    def _rows(self, block: Block, local: torch.Tensor) -> torch.Tensor:
        """The block's rows `local` as this epoch reads them: the center crop, or each row's chosen view (or
        for TTA evaluation, center and flip pairs)."""
        if self.flip is not None:
            return torch.stack([block.features[local], block.views[local, self.flip]], 1)
        if self.choice is None:
            return block.features[local]
        choice = self.choice[self.position[block.rows[local]]]
        table = torch.cat([block.features[local, None], block.views[local]], 1)
        return table[torch.arange(len(local), device=local.device), choice]


TrainRows = Union[TensorRows, StreamedRows]


def row_mask(rows: np.ndarray, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool per file row of `count`, set at `rows`: what `Block.local` picks a block's rows with."""
    mask = torch.zeros(count, dtype=torch.bool, device=device)
    mask[torch.as_tensor(rows, device=device)] = True
    return mask


def as_rows(x: torch.Tensor | StreamedRows, y: torch.Tensor, sampler: ViewSampler | ViewChoices | None) -> TrainRows:
    """The rows a fitter trains on: tensors (with their `sampler`) in memory, or streamed rows as they are
    (they carry their own sampler)."""
    return x if isinstance(x, StreamedRows) else TensorRows(x, y, sampler)


class RunningStats:
    """Per-feature mean and std over row blocks in one pass: each block's `feature_moments` (float32, as in
    memory), merged in float64 by Chan et al.'s formula: the streamed `feature_stats`."""

    def __init__(self, dim: int, device: torch.device):
        self.count, self.mean = 0, torch.zeros(dim, dtype=torch.float64, device=device)
        self.squares = torch.zeros_like(self.mean)

    def add(self, x: torch.Tensor) -> None:
        if len(x) == 0:
            return
        mean, squares = (moment.double() for moment in feature_moments(x))
        delta, total = mean - self.mean, self.count + len(x)
        self.squares += squares + delta.square() * (self.count * len(x) / total)
        self.mean += delta * (len(x) / total)
        self.count = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        std = (self.squares / max(self.count - 1, 1)).sqrt()
        return self.mean.float(), safe_std(std.float())
