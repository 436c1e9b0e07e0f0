"""CIFAR-10 and CIFAR-100 python releases: their pickles read straight into uint8 arrays, in batch-file order."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import InputError, refused_pickle
from .base import Dataset, SourceKind, Split, checked_labels


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
            labels = [np.asarray(b[layout.label_key]) for b in batches]
            images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        except (KeyError, ValueError) as exc:
            raise InputError(f"{base} does not hold {layout.title} python batches ({exc})") from None
        for name, batch, raw in zip(layout.files[split], batches, labels):
            checked_labels(raw, len(classes), str(base / name), rows=len(batch[b"data"]))
        out[split] = Split(split, np.concatenate(labels).astype(np.int64), images=images)
    return Dataset(layout.kind, root, classes, out)


def cifar_kind(layout: CifarLayout) -> SourceKind:
    """A CIFAR release as an entry of the table of kinds."""
    return SourceKind(
        layout.kind, f"{layout.dir}/ ({layout.contents})",
        detect=lambda root: (root / layout.dir).is_dir(),
        splits=lambda root: ("train", "test"),
        read=lambda root, splits: read_cifar(root, splits, layout),
        download=partial(download_cifar, layout=layout),
    )


KINDS = tuple(cifar_kind(layout) for layout in CIFAR_LAYOUTS.values())
