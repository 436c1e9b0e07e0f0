"""What every data source gives: ordered splits of labelled rows, its class names, and the kind it is.

A split is an in-memory uint8 array (N, H, W, 3), a list of image files, or images inside tar shards
(`TarMembers`, named like files: `shard.tar/key.jpg`); its rows keep the dataset's own order, so every cached row maps back to its source image. `SourceKind` is the one
interface a kind of source satisfies; the table of kinds is in `fastfeat.sources`.
"""
from __future__ import annotations

import bisect
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class TarMembers:
    """Where each row's image lies inside its tar shard, so that a loader reads it with one positioned read
    (no tar parsing, nothing held in memory). `indexes[s]` is shard s's index file (DALI's wds2idx format),
    listing `samples[s]` samples: a loader given every sample of a shard can hand that file to DALI as is."""

    shards: tuple[str, ...]
    indexes: tuple[str, ...]
    samples: np.ndarray  # (shards,) samples each index lists
    shard: np.ndarray  # (N,) each row's shard, an index into `shards`
    offset: np.ndarray  # (N,) the image member's data offset in its shard
    size: np.ndarray  # (N,) its size in bytes
    names: tuple[str, ...]  # (N,) its member name inside the shard

    def take(self, rows: slice | np.ndarray) -> TarMembers:
        return replace(self, shard=self.shard[rows], offset=self.offset[rows], size=self.size[rows],
                       names=tuple(np.asarray(self.names, dtype=object)[rows]))

    def heads(self, count: int) -> np.ndarray:
        """(N, count) uint8: the first `count` bytes of each row's member (zero past its end), gathered from each
        shard's memory map in one indexing: what says a member's format, without reading (or a call per) member."""
        heads = np.zeros((len(self.offset), count), np.uint8)
        ahead = np.arange(count)
        by_shard = np.argsort(self.shard, kind="stable")
        bounds = np.searchsorted(self.shard[by_shard], np.arange(len(self.shards) + 1))
        for shard, (first, last) in enumerate(zip(bounds[:-1], bounds[1:])):
            if first == last:
                continue
            rows = by_shard[first:last]
            data = np.memmap(self.shards[shard], dtype=np.uint8, mode="r")
            at = self.offset[rows, None] + ahead
            inside = (ahead < self.size[rows, None]) & (at < len(data))
            heads[rows] = np.where(inside, data[np.minimum(at, len(data) - 1)], 0)
        return heads

    def read(self, row: int) -> bytes:
        """Row `row`'s encoded image; a shard shorter than its index says is refused in one line."""
        shard, size = self.shards[self.shard[row]], int(self.size[row])
        fd = os.open(shard, os.O_RDONLY)
        try:
            data = os.pread(fd, size, int(self.offset[row]))
        finally:
            os.close(fd)
        if len(data) != size:
            raise InputError(f"{shard}: truncated tar (member {self.names[row]} ends past the end of the file)")
        return data


@dataclass(frozen=True)
class Split:
    """One split's rows: `images` (N, H, W, 3) uint8 for array datasets, or `files` for file-based ones
    (with `members` saying where in which tar shard each one is, for shards)."""

    name: str
    labels: np.ndarray
    images: np.ndarray | None = None
    files: tuple[str, ...] | None = None
    members: TarMembers | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, start: int, stop: int) -> Split:
        """The rows [start, stop) as a split of their own."""
        return self.take(slice(start, stop))

    def take(self, rows: slice | np.ndarray) -> Split:
        """The rows `rows` (a slice or an index array) as a split of their own."""
        files = None if self.files is None else tuple(np.asarray(self.files, dtype=object)[rows])
        return replace(self, labels=self.labels[rows], images=None if self.images is None else self.images[rows],
                       files=files, members=None if self.members is None else self.members.take(rows))


@dataclass(frozen=True)
class Dataset:
    kind: str  # the --dataset name of its kind ("cifar10", "folder", "list", ...)
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, Split]
    source: str = ""  # what was read, beside `root` (the list file's name, ...); "" when `root` says it all

    def empty_classes(self, split: str) -> list[str]:
        """The classes with no row in `split`: a head or a fine-tune could never learn them."""
        counts = np.bincount(self.splits[split].labels, minlength=len(self.classes))
        return [name for name, count in zip(self.classes, counts) if count == 0]

    def require_every_class(self) -> None:
        """Refuse to train when a split lacks a class (an empty class folder, a subset that missed one)."""
        for split in self.splits:
            missing = self.empty_classes(split)
            if missing:
                raise InputError(f"{self.root}: the {split} split has no images of class {', '.join(missing)}")


@dataclass(frozen=True)
class SourceKind:
    """One kind of data source, as `open_dataset` sees it. A new source is one of these in the table."""

    name: str  # its --dataset name
    layout: str  # what `root` holds, for --help, error lines and docs/sources.md
    detect: Callable[[Path], bool]  # whether `root` holds this layout (--dataset auto)
    splits: Callable[[Path], tuple[str, ...]]  # the splits `root` has
    read: Callable[[Path, tuple[str, ...]], Dataset]  # the splits asked for, rows in the dataset's order
    download: Callable[[Path], None] | None = None  # fetch into `root` (--download); None: not downloadable
    # this kind reading the per-split inputs and options of `SourceInputs`; None: it takes none of them
    bind: Callable[[SourceInputs], SourceKind] | None = None


@dataclass(frozen=True)
class SourceInputs:
    """What a kind may read beside `--data`: one path or pattern per split (--train-data, --test-data),
    which field holds the label (--label-key), a Hugging Face dataset's (image, label) columns."""

    split_data: tuple[tuple[str, str], ...] = ()  # (split, path or pattern) pairs
    label_key: str = "cls"
    columns: tuple[str | None, str | None] = (None, None)

    def given(self) -> bool:
        """Whether a shard-only input (--train-data, --test-data, --label-key) was given."""
        return bool(self.split_data) or self.label_key != SourceInputs.label_key


def checked_labels(raw, classes: int, where: str, rows: int | None = None) -> np.ndarray:
    """`raw` as int64 labels, refused in one line unless they are integers in [0, classes), one per row
    (`rows` images when the count is known apart from the labels). `where` names the file or split."""
    labels = np.asarray(raw)
    if labels.ndim != 1:
        raise InputError(f"{where}: labels must be one integer per image, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{where}: labels must be integers, got {labels.dtype}")
    if rows is not None and len(labels) != rows:
        raise InputError(f"{where}: {len(labels)} labels for {rows} images")
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise InputError(f"{where}: label {labels[bad[0]]} (row {bad[0]}) is outside the {classes} classes "
                         f"(0..{classes - 1})")
    return labels.astype(np.int64)


def visible(path: Path) -> bool:
    """False for hidden files and folders (`.*`: macOS `._x.jpg`, `.ipynb_checkpoints`, `.DS_Store`)."""
    return not path.name.startswith(".")


def balanced_rows(labels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Indices of at most `limit` rows, as many of each class as possible (a class short of rows
    leaves its share to the others; `seed` draws which classes take the remainder and which rows
    of each class), sorted: the subset keeps the dataset's order, whatever order the classes come in."""
    counts = np.bincount(labels)
    rng = np.random.default_rng(seed)
    budget = min(limit, len(labels))
    # the largest per-class share that fits: sum(min(counts, level)) <= budget
    level = bisect.bisect_right(range(counts.max() + 1), budget, key=lambda share: np.minimum(counts, share).sum()) - 1
    quota = np.minimum(counts, level)
    open_classes = np.flatnonzero(counts > level)
    quota[rng.permutation(open_classes)[: budget - quota.sum()]] += 1
    by_class, rank = _seeded_class_order(labels, rng)
    return np.sort(by_class[rank < quota[labels[by_class]]])


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows), each sorted: `fraction` of every class held out (rounded; at least
    one row of each class that has two or more, never a class's last row), drawn with `seed`."""
    counts = np.bincount(labels)
    held = np.clip(np.round(fraction * counts), 1 if fraction > 0 else 0, np.maximum(counts - 1, 0)).astype(np.int64)
    by_class, rank = _seeded_class_order(labels, np.random.default_rng(seed))
    out = rank < held[labels[by_class]]
    return np.sort(by_class[~out]), np.sort(by_class[out])


def few_shot_rows(labels: np.ndarray, shots: int, held: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(shot rows, validation rows), each sorted: `shots` rows of every class drawn with `seed`, then `held` more
    of each from the rest, so a K-shot trial validates on rows it never trains on; a class with fewer than
    shots + held rows is refused (it could not be drawn class-balanced)."""
    counts = np.bincount(labels)
    short = np.flatnonzero(counts < shots + held)
    if len(short):
        raise InputError(f"{shots} shots and {held} validation rows per class need {shots + held} train rows of every "
                         f"class; class {short[0]} has {counts[short[0]]}")
    by_class, rank = _seeded_class_order(labels, np.random.default_rng(seed))
    return np.sort(by_class[rank < shots]), np.sort(by_class[(rank >= shots) & (rank < shots + held)])


def _seeded_class_order(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every row grouped by class, in a seeded order within its class, and its rank there."""
    shuffled = rng.permutation(len(labels))
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]
    return by_class, np.arange(len(labels)) - np.searchsorted(labels[by_class], labels[by_class])
