"""Data sources: CIFAR-10 and CIFAR-100 python pickles and image class folders, as ordered splits.

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
SPLITS = ("train", "val", "test")
# a folder's val/ is its validation split when test/ is beside it, else its test split
FOLDER_SPLIT_DIRS = {"train": ("train",), "val": ("val",), "test": ("test", "val")}


@dataclass(frozen=True)
class CifarLayout:
    """One official CIFAR python release: its folder, pickles and keys (read by `read_cifar`)."""

    kind: str  # the --dataset name
    title: str  # what error lines call it
    dir: str
    files: dict[str, tuple[str, ...]]  # split -> its pickles, in row order
    meta: str  # the pickle holding the class names
    label_key: bytes
    names_key: bytes
    contents: str  # what the folder holds, for the download error line
    torchvision: str  # the torchvision.datasets class that knows the download url and md5


CIFAR_LAYOUTS = {layout.kind: layout for layout in (
    CifarLayout("cifar10", "CIFAR-10", "cifar-10-batches-py",
                {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                "batches.meta", b"labels", b"label_names", "data_batch_1..5 and test_batch", "CIFAR10"),
    # CIFAR-100: the 100 fine labels (the 20 coarse superclasses are left out)
    CifarLayout("cifar100", "CIFAR-100", "cifar-100-python", {"train": ("train",), "test": ("test",)},
                "meta", b"fine_labels", b"fine_label_names", "train, test and meta", "CIFAR100"),
)}
CIFAR10 = CIFAR_LAYOUTS["cifar10"]
DATASET_KINDS = ("auto", *CIFAR_LAYOUTS, "folder")


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
    kind: str  # "cifar10", "cifar100" or "folder"
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
    splits: tuple[str, ...] | None = ("train", "test"),
    limit: int | None = None,
    download: bool = False,
    seed: int = 0,
) -> Dataset:
    """Open `root` as CIFAR-10 (`root/cifar-10-batches-py`), CIFAR-100 (`root/cifar-100-python`) or an
    image folder tree; `limit` keeps a class-balanced subset of at most that many rows per split (see
    `balanced_rows`). `download` fetches CIFAR-100 for kind "cifar100", CIFAR-10 otherwise. `splits`
    None: every split the dataset has (see `dataset_splits`)."""
    root = Path(root)
    unknown = set(splits or ()) - set(SPLITS)
    if unknown or splits == ():
        raise InputError(f"unknown split(s) {sorted(unknown)}: choose from {','.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if kind not in DATASET_KINDS:
        raise InputError(f"unknown dataset kind {kind!r}: choose {', '.join(DATASET_KINDS[:-1])} or folder")
    if download:
        if kind == "folder":
            raise InputError("--download only applies to CIFAR-10 and CIFAR-100 (--dataset cifar10 or cifar100)")
        kind = "cifar10" if kind == "auto" else kind
        download_cifar(root, CIFAR_LAYOUTS[kind])
    if not root.is_dir():
        raise InputError(f"data directory {root} does not exist (use --download for CIFAR-10)")
    if kind == "auto":
        kind = detect_kind(root)
    splits = dataset_splits(root, kind) if splits is None else splits
    if "val" in splits and "val" not in dataset_splits(root, kind):
        has = "no val split" if kind != "folder" else "no val/ beside its test/ (a lone val/ is its test split)"
        raise InputError(f"{root} has {has}: cache train,test; train-head holds out --val-fraction of train instead")
    if kind == "folder":
        dataset = read_folder(root, splits)
    else:
        dataset = read_cifar(root, splits, CIFAR_LAYOUTS[kind])
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


def _seeded_class_order(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every row grouped by class, in a seeded order within its class, and its rank there."""
    shuffled = rng.permutation(len(labels))
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]
    return by_class, np.arange(len(labels)) - np.searchsorted(labels[by_class], labels[by_class])


def dataset_splits(root: Path, kind: str) -> tuple[str, ...]:
    """The splits a dataset has: train and test, and val for an image folder with val/ beside test/."""
    own_val = kind == "folder" and (root / "val").is_dir() and (root / "test").is_dir()
    return SPLITS if own_val else ("train", "test")


def detect_kind(root: Path) -> str:
    """The layout `root` holds: a CIFAR release folder, else class folders; both CIFARs is ambiguous."""
    found = [layout for layout in CIFAR_LAYOUTS.values() if (root / layout.dir).is_dir()]
    if len(found) > 1:
        raise InputError(f"{root} holds both {' and '.join(f'{f.dir}/' for f in found)}: pass "
                         f"{' or '.join(f'--dataset {f.kind}' for f in found)} to say which")
    if found:
        return found[0].kind
    if (root / "train").is_dir() or (root / "test").is_dir() or (root / "val").is_dir():
        return "folder"
    raise InputError(
        f"{root} has neither a CIFAR release ({' or '.join(f'{f.dir}/' for f in CIFAR_LAYOUTS.values())}) nor "
        "train/ and test/ class folders (use --download for CIFAR-10, or --dataset to say which layout)"
    )


def download_cifar(root: Path, layout: CifarLayout) -> None:
    """Fetch and unpack an official CIFAR python release into `root` with torchvision."""
    if (root / layout.dir).is_dir():
        return
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive

    release = getattr(torchvision.datasets, layout.torchvision)
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(release.url, str(root), filename=release.filename, md5=release.tgz_md5)
    except Exception as exc:  # network errors come in many types (URLError, HTTPError, OSError, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"could not download {layout.title} ({reason}); download {release.url} elsewhere and "
            f"unpack it so that {root / layout.dir}/ holds {layout.contents}"
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


def _unpickle(path: Path, title: str = CIFAR10.title) -> dict:
    """A CIFAR pickle (`title` names the release in error lines) through the restricted unpickler."""
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise InputError(f"missing {title} file {path}") from None
    except _RefusedGlobal as exc:
        raise refused_pickle(f"{title} file", path, "numpy arrays and plain values", str(exc)) from None
    except Exception as exc:
        raise InputError(f"unreadable {title} file {path}: {exc}") from None
    if not isinstance(batch, dict):
        raise InputError(f"{path} is not a {title} python batch (a dict)")
    return batch


def read_cifar(root: Path, splits: tuple[str, ...], layout: CifarLayout) -> Dataset:
    """Read an official CIFAR release's pickles straight into (N, 32, 32, 3) uint8 arrays, in file order."""
    base = root / layout.dir
    meta = _unpickle(base / layout.meta, layout.title)
    try:
        classes = tuple(name.decode() for name in meta[layout.names_key])
    except (KeyError, AttributeError, TypeError):
        raise InputError(f"{base / layout.meta} has no {layout.title} class names ({layout.names_key!r})") from None
    out = {}
    for split in splits:
        batches = [_unpickle(base / name, layout.title) for name in layout.files[split]]
        try:
            data = np.concatenate([b[b"data"] for b in batches])
            labels = np.concatenate([np.asarray(b[layout.label_key], dtype=np.int64) for b in batches])
            images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        except (KeyError, ValueError) as exc:
            raise InputError(f"{base} does not hold {layout.title} python batches ({exc})") from None
        out[split] = Split(split, labels, images=images)
    return Dataset(layout.kind, root, classes, out)


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
