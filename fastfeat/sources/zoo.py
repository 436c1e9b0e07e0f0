"""torchvision's datasets by name (`--dataset mnist|fashion_mnist|dtd|oxford_pets`), read from their on-disk layout.

Array sets (MNIST, Fashion-MNIST) are read straight from their idx files into uint8 arrays, grayscale made
3-channel; file sets (DTD, Oxford-IIIT Pet) take the image paths and labels of torchvision's own class
(built with download=False, which only reads its split lists), so decoding stays batched in the loaders.
Each keeps its official splits (a dataset's own val is fastfeat's val); `--download` uses torchvision's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import Dataset, SourceKind, Split


def torchvision_class(name: str):
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


def download(root: Path, title: str, build) -> None:
    """Run torchvision's downloader `build(root)`; any failure (offline, a bad checksum) is one line."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        build(str(root))
    except Exception as exc:  # network errors come in many types (URLError, HTTPError, OSError, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"could not download {title} into {root} ({reason})") from None


@dataclass(frozen=True)
class IdxSet:
    """An MNIST-style set: `root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`."""

    kind: str
    torchvision: str  # the class (and the folder name under root)

    def raw(self, root: Path) -> Path:
        return root / self.torchvision / "raw"

    def read(self, root: Path, splits: tuple[str, ...]) -> Dataset:
        from torchvision.datasets.mnist import read_image_file, read_label_file

        out = {}
        for split in splits:
            prefix = self.raw(root) / ("train" if split == "train" else "t10k")
            try:
                gray = read_image_file(f"{prefix}-images-idx3-ubyte").numpy()
                labels = read_label_file(f"{prefix}-labels-idx1-ubyte").numpy()
            except Exception as exc:  # a missing or malformed idx file
                raise InputError(f"unreadable {self.torchvision} {split} files {prefix}-*-ubyte ({exc})") from None
            if len(gray) != len(labels):
                raise InputError(f"{prefix}-*-ubyte: {len(labels)} labels for {len(gray)} images")
            out[split] = Split(split, labels.astype(np.int64), images=np.repeat(gray[..., None], 3, axis=3))
        return Dataset(self.kind, root, tuple(torchvision_class(self.torchvision).classes), out)

    def source_kind(self) -> SourceKind:
        return SourceKind(
            self.kind, f"{self.torchvision}/raw/ (torchvision's idx files)",
            detect=lambda root: self.raw(root).is_dir(), splits=lambda root: ("train", "test"), read=self.read,
            download=lambda root: download(root, self.torchvision,
                                           lambda r: torchvision_class(self.torchvision)(r, download=True)),
        )


@dataclass(frozen=True)
class FileSet:
    """A set whose torchvision class lists image files and labels per split (`files`, `labels` attributes)."""

    kind: str
    torchvision: str
    folder: str  # what the class keeps under root
    split_names: dict[str, str]  # fastfeat split -> the class's split argument
    files: str = "_image_files"
    labels: str = "_labels"

    def open(self, root: Path, split: str):
        try:
            return torchvision_class(self.torchvision)(str(root), split=self.split_names[split])
        except Exception as exc:  # RuntimeError "Dataset not found", a malformed split list
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{root / self.folder}: not a readable {self.torchvision} ({reason}; "
                             "--download fetches it)") from None

    def read(self, root: Path, splits: tuple[str, ...]) -> Dataset:
        sets = {split: self.open(root, split) for split in splits}
        classes = tuple(self.open(root, "train").classes)
        out = {split: Split(split, np.asarray(getattr(s, self.labels), dtype=np.int64),
                            files=tuple(str(f) for f in getattr(s, self.files))) for split, s in sets.items()}
        return Dataset(self.kind, root, classes, out)

    def source_kind(self) -> SourceKind:
        return SourceKind(
            self.kind, f"{self.folder}/ (torchvision's {self.torchvision} layout)",
            detect=lambda root: (root / self.folder).is_dir(), splits=lambda root: tuple(self.split_names),
            read=self.read,
            download=lambda root: download(root, self.torchvision, lambda r: [
                torchvision_class(self.torchvision)(r, split=s, download=True) for s in self.split_names.values()]),
        )


SETS = (
    IdxSet("mnist", "MNIST"),
    IdxSet("fashion_mnist", "FashionMNIST"),
    FileSet("dtd", "DTD", "dtd", {"train": "train", "val": "val", "test": "test"}),
    FileSet("oxford_pets", "OxfordIIITPet", "oxford-iiit-pet", {"train": "trainval", "test": "test"}, files="_images"),
)
KINDS = tuple(s.source_kind() for s in SETS)
