"""Image class folders: `root/<split>/<class>/*.{jpg,jpeg,png}`, classes sorted, files sorted within a class.

Hidden files and folders (`.*`: macOS `._x.jpg`, `.ipynb_checkpoints`) are neither images nor classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import IMAGE_SUFFIXES, SPLITS, Dataset, SourceKind, Split, visible

# a folder's val/ is its validation split when test/ is beside it, else its test split
FOLDER_SPLIT_DIRS = {"train": ("train",), "val": ("val",), "test": ("test", "val")}


def folder_splits(root: Path) -> tuple[str, ...]:
    """train and test, and val when val/ sits beside test/ (a lone val/ is the test split)."""
    return SPLITS if (root / "val").is_dir() and (root / "test").is_dir() else ("train", "test")


def class_dirs(split_dir: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir() and visible(p)))


def image_names(class_dir: Path) -> list[str]:
    return sorted(p.name for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and visible(p))


def read_folder(root: Path, splits: tuple[str, ...]) -> Dataset:
    """Read `root/<split>/<class>/*.{jpg,jpeg,png}`: classes sorted, files sorted within a class."""
    out, classes = {}, None
    for split in splits:
        split_dir = next((root / d for d in FOLDER_SPLIT_DIRS[split] if (root / d).is_dir()), None)
        if split_dir is None:
            raise InputError(f"{root} has no {' or '.join(FOLDER_SPLIT_DIRS[split])}/ folder for split {split!r}")
        split_classes = class_dirs(split_dir)
        if not split_classes:
            raise InputError(f"{split_dir} has no class folders")
        if classes is not None and split_classes != classes:
            raise InputError(f"{split_dir} has classes {list(split_classes)}, other splits have {list(classes)}")
        classes = split_classes
        files, labels = [], []
        for label, name in enumerate(classes):
            names = image_names(split_dir / name)
            files += [str(split_dir / name / n) for n in names]
            labels += [label] * len(names)
        if not files:
            raise InputError(f"{split_dir} has no .jpg/.jpeg/.png images")
        out[split] = Split(split, np.asarray(labels, dtype=np.int64), files=tuple(files))
    return Dataset("folder", root, classes, out)


KIND = SourceKind(
    "folder", "train/ and test/ (or val/) of <class>/*.jpg|jpeg|png",
    detect=lambda root: any((root / d).is_dir() for d in SPLITS),
    splits=folder_splits, read=read_folder,
)
