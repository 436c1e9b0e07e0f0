"""torchvision's dataset zoo by name (`--dataset mnist|svhn|flowers102|...`), read from each set's on-disk layout.

Array sets (MNIST, Fashion-MNIST, SVHN, STL-10, PCAM) are read straight from their idx/.mat/.bin/.h5 files
into uint8 (N, H, W, 3) arrays, grayscale made 3-channel, so a loader slices whole batches. File sets take the
image paths and labels that torchvision's own class lists (built with download=False, which reads only its
split lists, never an image), so decoding stays batched in DALI or torch. Each keeps its official splits (a
dataset's own val is fastfeat's val); a set with none (Caltech-101, SUN397, EuroSAT) holds out a fixed,
class-stratified `HELD_OUT` of its images as the test split. `--download` runs torchvision's downloaders.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import Dataset, SourceKind, Split, checked_labels, stratified_holdout

HELD_OUT = 0.2  # the test share of a set without official splits, drawn once with seed 0 (not --seed)


def torchvision_class(name: str):
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


def first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def download(root: Path, title: str, layout: str, build: Callable[[str], object]) -> None:
    """Run torchvision's downloader `build(root)`; any failure (offline, a bad checksum) is one line that
    says what to put where instead."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        build(str(root))
    except Exception as exc:  # network errors come in many types (URLError, HTTPError, OSError, ...)
        raise InputError(f"could not download {title} into {root} ({first_line(exc)}); fetch it elsewhere and "
                         f"unpack it so that {root}/ holds {layout}") from None


def tv_download(name: str, split_args: tuple[str | None, ...]) -> Callable[[str], None]:
    """torchvision's class `name` built with download=True once per split argument (None: no split)."""
    def build(root: str) -> None:
        for split in split_args:
            torchvision_class(name)(root, download=True, **({} if split is None else {"split": split}))
    return build


def missing(path: Path, title: str) -> InputError:
    return InputError(f"missing {title} file {path} (--download fetches it)")


# ---- array sets: the rows of one split read from its own files ------------------------------------------------


def read_idx(root: Path, split: str, folder: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """MNIST-style idx files: root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, gray."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    prefix = root / folder / "raw" / ("train" if split == "train" else "t10k")
    images, labels = Path(f"{prefix}-images-idx3-ubyte"), Path(f"{prefix}-labels-idx1-ubyte")
    try:
        return read_image_file(str(images)).numpy(), read_label_file(str(labels)).numpy(), [images, labels]
    except Exception as exc:  # a missing or malformed idx file
        raise InputError(f"unreadable {folder} {split} files {prefix}-*-ubyte ({first_line(exc)})") from None


def read_svhn(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """root/{train,test}_32x32.mat: X (32, 32, 3, N), y (N, 1) with digit 0 stored as 10."""
    from scipy.io import loadmat

    path = root / f"{split}_32x32.mat"
    if not path.is_file():
        raise missing(path, "SVHN")
    try:
        mat = loadmat(path)
        images, labels = mat["X"].transpose(3, 0, 1, 2), mat["y"].astype(np.int64).reshape(-1)
    except Exception as exc:  # scipy raises ValueError, MatReadError, KeyError for a broken file
        raise InputError(f"unreadable SVHN file {path} ({first_line(exc)})") from None
    return images, np.where(labels == 10, 0, labels), [path]


def read_stl10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """root/stl10_binary/{train,test}_{X,y}.bin: column-major 3x96x96 uint8 images, labels 1..10."""
    images, labels = (root / "stl10_binary" / f"{split}_{part}.bin" for part in "Xy")
    for path in (images, labels):
        if not path.is_file():
            raise missing(path, "STL-10")
    pixels = np.fromfile(images, dtype=np.uint8)
    if pixels.size % (3 * 96 * 96):
        raise InputError(f"{images} is not a whole number of 3x96x96 images ({pixels.size} bytes)")
    return (pixels.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1), np.fromfile(labels, dtype=np.uint8).astype(np.int64) - 1,
            [images, labels])


PCAM_NAMES = {"train": "train", "val": "valid", "test": "test"}


def read_pcam(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """root/pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5: x (N, 96, 96, 3), y (N, 1, 1, 1).
    An uncompressed contiguous x is memory-mapped, not read: PCAM's train split alone is 7 GB."""
    import h5py

    paths = [root / "pcam" / f"camelyonpatch_level_2_split_{PCAM_NAMES[split]}_{part}.h5" for part in "xy"]
    for path in paths:
        if not path.is_file():
            raise missing(path, "PCAM")
    try:
        with h5py.File(paths[0], "r") as f:
            x = f["x"]
            offset = x.id.get_offset() if x.chunks is None and x.compression is None else None
            images = (np.memmap(paths[0], np.uint8, "r", offset, x.shape) if offset is not None and x.dtype == np.uint8
                      else x[()])
        with h5py.File(paths[1], "r") as f:
            labels = f["y"][()].reshape(-1).astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"unreadable PCAM {split} files {paths[0].parent}/ ({first_line(exc)})") from None
    return images, labels, paths


@dataclass(frozen=True)
class ArraySet:
    """A set whose splits are arrays in its own files, read by `reader(root, split)` -> (images, labels, files)."""

    kind: str
    title: str
    layout: str  # what root holds
    detect_path: str  # a path under root that only this set has
    classes: Callable[[], tuple[str, ...]]  # called when read: MNIST's names come from torchvision, imported late
    split_args: dict[str, str | None]  # fastfeat split -> torchvision's split argument, for --download
    reader: Callable[[Path, str], tuple[np.ndarray, np.ndarray, list[Path]]]
    torchvision: str

    def read(self, root: Path, splits: tuple[str, ...]) -> Dataset:
        out, read, classes = {}, [], self.classes()
        for split in splits:
            images, labels, files = self.reader(root, split)
            if images.ndim == 3:  # grayscale: the loaders take 3 channels
                images = np.repeat(images[..., None], 3, axis=3)
            if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
                raise InputError(f"{files[0]}: expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
            labels = checked_labels(labels, len(classes), f"{files[-1]} ({split})", rows=len(images))
            contiguous = images if isinstance(images, np.memmap) else np.ascontiguousarray(images)
            out[split], read = Split(split, labels, images=contiguous), read + files
        # each file's name, size and mtime: --resume refuses a rewritten array file (rows_sha256 sees only labels)
        source = ",".join(f"{f.relative_to(root)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in read)
        return Dataset(self.kind, root, classes, out, source=source)

    def source_kind(self) -> SourceKind:
        return SourceKind(
            self.kind, self.layout, detect=lambda root: (root / self.detect_path).exists(),
            splits=lambda root: tuple(self.split_args), read=self.read,
            download=lambda root: download(root, self.title, self.layout,
                                           tv_download(self.torchvision, tuple(self.split_args.values()))),
        )


def idx_set(kind: str, folder: str) -> ArraySet:
    return ArraySet(kind, folder, f"{folder}/raw/ (torchvision's idx files)", f"{folder}/raw",
                    lambda: tuple(torchvision_class(folder).classes), {"train": None, "test": None},
                    lambda root, split: read_idx(root, split, folder), folder)


# ---- file sets: torchvision's class lists the files -------------------------------------------------------------


def image_files(s) -> tuple[list, list]:
    return s._image_files, s._labels


def samples(attr: str) -> Callable[[object], tuple[list, list]]:
    """(files, labels) from a list of (path, label) pairs (ImageFolder's `samples`, GTSRB's `_samples`)."""
    def rows(s) -> tuple[list, list]:
        pairs = getattr(s, attr)
        return [p for p, _ in pairs], [y for _, y in pairs]
    return rows


def sorted_files(s) -> tuple[list, list]:
    """SUN397 lists its images in the file system's order: sorted here, so that the rows never depend on it."""
    order = np.argsort(np.asarray([str(f) for f in s._image_files]), kind="stable")
    return [s._image_files[i] for i in order], [s._labels[i] for i in order]


def caltech_files(s) -> tuple[list, list]:
    """Caltech101 numbers each category's images image_0001.jpg.. (it lists only how many there are)."""
    base = Path(s.root) / "101_ObjectCategories"
    return [base / s.categories[y] / f"image_{i:04d}.jpg" for i, y in zip(s.index, s.y)], s.y


@dataclass(frozen=True)
class FileSet:
    """A set whose torchvision class lists each split's image files and labels (`rows(instance)`)."""

    kind: str
    torchvision: str
    folder: str  # what the class keeps under root
    layout: str  # the files in folder/, for error lines and docs
    split_args: dict[str, str] | None  # fastfeat split -> the class's split argument; None: one set, held out
    rows: Callable[[object], tuple[list, list]] = image_files
    names: Callable[[object], tuple[str, ...]] = lambda s: tuple(s.classes)
    split_classes: bool = False  # each split's labels index its own class list (an ImageFolder per split)

    def open(self, root: Path, split: str | None):
        if not (root / self.folder).is_dir():  # before the class runs: Caltech101 would make the folder
            raise InputError(f"{root / self.folder}: not a readable {self.torchvision} (no such folder; "
                             "--download fetches it)")
        try:
            return torchvision_class(self.torchvision)(str(root), **({} if split is None else {"split": split}))
        except Exception as exc:  # RuntimeError "Dataset not found", a malformed split list, a bad .mat
            raise InputError(f"{root / self.folder}: not a readable {self.torchvision} ({first_line(exc)}; "
                             "--download fetches it)") from None

    def split(self, root: Path, listing, name: str, classes: tuple[str, ...]) -> Split:
        files, labels = self.rows(listing)
        labels = np.asarray(labels, dtype=np.int64)
        if self.split_classes:  # labels index this split's own class list: made to index `classes`
            index = {c: i for i, c in enumerate(classes)}
            names = self.names(listing)
            unknown = next((c for c in names if c not in index), None)
            if unknown is not None:
                raise InputError(f"{root / self.folder} ({name}): class {unknown!r} is not one of the train split's")
            labels = np.asarray([index[c] for c in names], dtype=np.int64)[labels] if len(labels) else labels
        labels = checked_labels(labels, len(classes), f"{root / self.folder} ({name})", rows=len(files))
        return Split(name, labels, files=tuple(str(f) for f in files))

    def read(self, root: Path, splits: tuple[str, ...]) -> Dataset:
        """The class names are the train split's (torchvision names Oxford pets' from a split's own images)."""
        if self.split_args is None:
            listing = self.open(root, None)
            classes = self.names(listing)
            whole = self.split(root, listing, "train", classes)
            parts = dict(zip(("train", "test"), stratified_holdout(whole.labels, HELD_OUT, seed=0)))
            return Dataset(self.kind, root, classes, {s: replace(whole.take(parts[s]), name=s) for s in splits})
        listings = {split: self.open(root, self.split_args[split]) for split in {"train", *splits}}
        classes = self.names(listings["train"])
        return Dataset(self.kind, root, classes, {s: self.split(root, listings[s], s, classes) for s in splits})

    def source_kind(self) -> SourceKind:
        split_args = (None,) if self.split_args is None else tuple(self.split_args.values())
        return SourceKind(
            self.kind, f"{self.folder}/ ({self.layout})", detect=lambda root: (root / self.folder).is_dir(),
            splits=lambda root: ("train", "test") if self.split_args is None else tuple(self.split_args),
            read=self.read,
            download=lambda root: download(root, self.torchvision, f"{self.folder}/ ({self.layout})",
                                           tv_download(self.torchvision, split_args)),
        )


TRAIN_VAL_TEST = {"train": "train", "val": "val", "test": "test"}
TRAIN_TEST = {"train": "train", "test": "test"}
GTSRB_CLASSES = tuple(f"{i:05d}" for i in range(43))  # its training folders' names; the set names no classes

SETS = (
    idx_set("mnist", "MNIST"),
    idx_set("fashion_mnist", "FashionMNIST"),
    ArraySet("svhn", "SVHN", "train_32x32.mat and test_32x32.mat (SVHN's cropped digits)", "train_32x32.mat",
             lambda: tuple(str(i) for i in range(10)), TRAIN_TEST, read_svhn, "SVHN"),
    ArraySet("stl10", "STL10", "stl10_binary/ ({train,test}_{X,y}.bin)", "stl10_binary",
             lambda: ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"), TRAIN_TEST,
             read_stl10, "STL10"),
    ArraySet("pcam", "PCAM", "pcam/ (camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5)", "pcam",
             lambda: ("no metastatic tissue", "metastatic tissue"), TRAIN_VAL_TEST, read_pcam, "PCAM"),
    FileSet("dtd", "DTD", "dtd", "dtd/images/<class>/*.jpg, dtd/labels/{train,val,test}1.txt", TRAIN_VAL_TEST),
    FileSet("oxford_pets", "OxfordIIITPet", "oxford-iiit-pet", "images/*.jpg, annotations/{trainval,test}.txt",
            {"train": "trainval", "test": "test"}, rows=lambda s: (s._images, s._labels)),
    FileSet("flowers102", "Flowers102", "flowers-102", "jpg/image_*.jpg, imagelabels.mat, setid.mat", TRAIN_VAL_TEST),
    FileSet("food101", "Food101", "food-101", "images/<class>/*.jpg, meta/{train,test}.json", TRAIN_TEST),
    FileSet("stanford_cars", "StanfordCars", "stanford_cars",
            "cars_{train,test}/*.jpg, devkit/{cars_meta,cars_train_annos}.mat, cars_test_annos_withlabels.mat",
            TRAIN_TEST, rows=samples("_samples")),
    FileSet("fgvc_aircraft", "FGVCAircraft", "fgvc-aircraft-2013b",
            "data/images/*.jpg, data/variants.txt, data/images_variant_{train,val,test}.txt", TRAIN_VAL_TEST),
    FileSet("caltech101", "Caltech101", "caltech101", "101_ObjectCategories/<class>/image_*.jpg", None,
            rows=caltech_files, names=lambda s: tuple(s.categories)),
    FileSet("sun397", "SUN397", "SUN397", "ClassName.txt, <letter>/<class>/sun_*.jpg", None,
            rows=sorted_files),
    FileSet("eurosat", "EuroSAT", "eurosat", "2750/<class>/*.jpg", None, rows=samples("samples")),
    FileSet("gtsrb", "GTSRB", "gtsrb", "GTSRB/Training/<class>/*.ppm, GTSRB/Final_Test/Images/*.ppm, "
            "GT-final_test.csv", TRAIN_TEST, rows=samples("_samples"), names=lambda s: GTSRB_CLASSES),
    FileSet("country211", "Country211", "country211", "{train,valid,test}/<country>/*.jpg",
            {"train": "train", "val": "valid", "test": "test"}, rows=samples("samples"), split_classes=True),
)
KINDS = tuple(s.source_kind() for s in SETS)
