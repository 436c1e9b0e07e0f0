"""Data sources: CIFAR-10 python pickles and image class folders, as ordered splits.

A split is either an in-memory uint8 array (N, H, W, 3) or a list of image files; its rows keep
the dataset's order (CIFAR: batch-file order; folders: sorted class, then sorted file name), so
every cached row maps back to its source image.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import InputError

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
        return replace(
            self,
            labels=self.labels[start:stop],
            images=None if self.images is None else self.images[start:stop],
            files=None if self.files is None else self.files[start:stop],
        )


@dataclass(frozen=True)
class Dataset:
    kind: str  # "cifar10" or "folder"
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, Split]


def open_dataset(
    root: str | Path,
    kind: str = "auto",
    splits: tuple[str, ...] = ("train", "test"),
    limit: int | None = None,
    download: bool = False,
) -> Dataset:
    """Open `root` as CIFAR-10 (`root/cifar-10-batches-py`) or an image folder tree."""
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
        dataset = replace(dataset, splits={n: s.rows(0, limit) for n, s in dataset.splits.items()})
    return dataset


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


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise InputError(f"missing CIFAR-10 file {path}") from None
    except Exception as exc:
        raise InputError(f"unreadable CIFAR-10 file {path}: {exc}") from None


def read_cifar10(root: Path, splits: tuple[str, ...]) -> Dataset:
    """Read the official pickles straight into (N, 32, 32, 3) uint8 arrays, in batch-file order."""
    base = root / CIFAR_DIR
    meta = _unpickle(base / "batches.meta")
    classes = tuple(name.decode() for name in meta[b"label_names"])
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
