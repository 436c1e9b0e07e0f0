"""Data sources: CIFAR-10 python pickles and image class folders, as ordered splits.

A split is either an in-memory uint8 array (N, H, W, 3) or a list of image files; its rows keep
the dataset's order (CIFAR: batch-file order; folders: sorted class, then sorted file name), so
every cached row maps back to its source image.
"""
from __future__ import annotations

import bisect
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import InputError, refused_pickle

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
FOLDER_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}


@dataclass(frozen=True)
class Split:
    """One split's rows: `images` (N, H, W, 3) uint8 for array datasets, or `files` for folders."""

    name: str
    labels: np.ndarray
    images: np.ndarray | None = None
    files: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, start: int, stop: int) -> Split:
        """The rows [start, stop) as a split of their own."""
        return self.take(slice(start, stop))

    def take(self, rows: slice | np.ndarray) -> Split:
        """The rows `rows` (a slice or an index array) as a split of their own."""
        files = None if self.files is None else tuple(np.asarray(self.files, dtype=object)[rows])
        return replace(self, labels=self.labels[rows], images=None if self.images is None else self.images[rows],
                       files=files)


@dataclass(frozen=True)
class Dataset:
    kind: str  # "cifar10" or "folder"
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, Split]

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


def open_dataset(
    root: str | Path,
    kind: str = "auto",
    splits: tuple[str, ...] = ("train", "test"),
    limit: int | None = None,
    download: bool = False,
    seed: int = 0,
) -> Dataset:
    """Open `root` as CIFAR-10 (`root/cifar-10-batches-py`) or an image folder tree; `limit` keeps
    a class-balanced subset of at most that many rows per split (see `balanced_rows`)."""
    root = Path(root)
    unknown = set(splits) - set(CIFAR_FILES)
    if unknown or not splits:
        raise InputError(f"unknown split(s) {sorted(unknown)}: choose from train,test")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if download:
        if kind == "folder":
            raise InputError("--download only applies to CIFAR-10 (--dataset cifar10)")
        download_cifar10(root)
        kind = "cifar10"
    if not root.is_dir():
        raise InputError(f"data directory {root} does not exist (use --download for CIFAR-10)")
    if kind == "auto":
        kind = detect_kind(root)
    if kind == "cifar10":
        dataset = read_cifar10(root, splits)
    elif kind == "folder":
        dataset = read_folder(root, splits)
    else:
        raise InputError(f"unknown dataset kind {kind!r}: choose auto, cifar10 or folder")
    if limit is not None:
        if limit < len(dataset.classes):
            raise InputError(f"--limit {limit} is smaller than the {len(dataset.classes)} classes: "
                             "a subset must hold every class")
        subsets = {n: s.take(balanced_rows(s.labels, limit, seed)) for n, s in dataset.splits.items()}
        dataset = replace(dataset, splits=subsets)
    return dataset


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
    shuffled = rng.permutation(len(labels))
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]  # each class's rows in a seeded order
    rank = np.arange(len(labels)) - np.searchsorted(labels[by_class], labels[by_class])
    return np.sort(by_class[rank < quota[labels[by_class]]])


def detect_kind(root: Path) -> str:
    if (root / CIFAR_DIR).is_dir():
        return "cifar10"
    if (root / "train").is_dir() or (root / "test").is_dir() or (root / "val").is_dir():
        return "folder"
    raise InputError(
        f"{root} has neither {CIFAR_DIR}/ nor train/ and test/ class folders "
        "(use --download for CIFAR-10, or --dataset to say which layout)"
    )


def download_cifar10(root: Path) -> None:
    """Fetch and unpack the official CIFAR-10 python release into `root` with torchvision."""
    if (root / CIFAR_DIR).is_dir():
        return
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as exc:  # network errors come in many types (URLError, HTTPError, OSError, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"could not download CIFAR-10 ({reason}); download {CIFAR10.url} elsewhere and "
            f"unpack it so that {root / CIFAR_DIR}/ holds data_batch_1..5 and test_batch"
        ) from None


# What the official batches (python 2 pickles), and numpy arrays pickled by python 3 with any protocol,
# need to rebuild: numpy arrays and dtypes, and latin-1 bytes for protocol 2. Nothing that runs code.
CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


class _RefusedGlobal(pickle.UnpicklingError):
    """A global outside CIFAR_PICKLE_GLOBALS; the message is its name."""


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler limited to CIFAR_PICKLE_GLOBALS: a plain pickle.load of a crafted batch file
    would call whatever function it names."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise InputError(f"missing CIFAR-10 file {path}") from None
    except _RefusedGlobal as exc:
        raise refused_pickle("CIFAR-10 file", path, "numpy arrays and plain values", str(exc)) from None
    except Exception as exc:
        raise InputError(f"unreadable CIFAR-10 file {path}: {exc}") from None
    if not isinstance(batch, dict):
        raise InputError(f"{path} is not a CIFAR-10 python batch (a dict)")
    return batch


def read_cifar10(root: Path, splits: tuple[str, ...]) -> Dataset:
    """Read the official pickles straight into (N, 32, 32, 3) uint8 arrays, in batch-file order."""
    base = root / CIFAR_DIR
    meta = _unpickle(base / "batches.meta")
    try:
        classes = tuple(name.decode() for name in meta[b"label_names"])
    except (KeyError, AttributeError, TypeError):
        raise InputError(f"{base / 'batches.meta'} has no CIFAR-10 class names (b'label_names')") from None
    out = {}
    for split in splits:
        batches = [_unpickle(base / name) for name in CIFAR_FILES[split]]
        try:
            data = np.concatenate([b[b"data"] for b in batches])
            labels = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])
            images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        except (KeyError, ValueError) as exc:
            raise InputError(f"{base} does not hold CIFAR-10 python batches ({exc})") from None
        out[split] = Split(split, labels, images=images)
    return Dataset("cifar10", root, classes, out)


def read_folder(root: Path, splits: tuple[str, ...]) -> Dataset:
    """Read `root/<split>/<class>/*.{jpg,jpeg,png}`: classes sorted, files sorted within a class."""
    out, classes = {}, None
    for split in splits:
        split_dir = next((root / d for d in FOLDER_SPLIT_DIRS[split] if (root / d).is_dir()), None)
        if split_dir is None:
            raise InputError(f"{root} has no {' or '.join(FOLDER_SPLIT_DIRS[split])}/ folder for split {split!r}")
        split_classes = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
        if not split_classes:
            raise InputError(f"{split_dir} has no class folders")
        if classes is not None and split_classes != classes:
            raise InputError(f"{split_dir} has classes {list(split_classes)}, other splits have {list(classes)}")
        classes = split_classes
        files, labels = [], []
        for label, name in enumerate(classes):
            names = sorted(p.name for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += [str(split_dir / name / n) for n in names]
            labels += [label] * len(names)
        if not files:
            raise InputError(f"{split_dir} has no .jpg/.jpeg/.png images")
        out[split] = Split(split, np.asarray(labels, dtype=np.int64), files=tuple(files))
    return Dataset("folder", root, classes, out)
