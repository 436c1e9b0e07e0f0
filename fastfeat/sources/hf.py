"""Hugging Face datasets (`--dataset hf:NAME[:CONFIG]`, or `hf` for a local save_to_disk or parquet directory).

The image and label columns are found by their feature types (`Image`, `ClassLabel`) unless named; class
names come from the `ClassLabel`, splits from the dataset's own (validation/valid/val is fastfeat's val).
Images are kept encoded: each split's bytes are written once, as they are, to
`<--data>/hf-images/<split>-<fingerprint>/` (a temp folder renamed when complete), so DALI or torch decodes
them in batches like any image folder; a changed dataset has another fingerprint, hence other files.
Needs the optional extra `hf` (the `datasets` package), imported only when a Hugging Face source is read.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import Dataset, SourceKind, Split, checked_labels
from .zoo import first_line

PREFIX = "hf:"
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val"), "test": ("test",)}
EXPORT = "hf-images"
MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"), (b"P6", ".ppm"))


def is_hf(kind: str) -> bool:
    return kind == "hf" or kind.startswith(PREFIX)


def datasets_module():
    try:
        import datasets
    except ImportError:
        raise InputError("Hugging Face datasets need the `datasets` package: pip install 'fastfeat[hf]'") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def local(root: Path) -> bool:
    """Whether `root` is a save_to_disk directory (a DatasetDict or a single Dataset)."""
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def load(root: Path, hub: str | None) -> dict:
    """{fastfeat split: datasets.Dataset} of the hub dataset `hub` (NAME or NAME:CONFIG, cached in `root`),
    or of the local directory `root` (memory-mapped arrow files: loading twice is cheap)."""
    datasets = datasets_module()
    where = f"Hugging Face dataset {hub}" if hub else f"{root} as a Hugging Face dataset"
    try:
        if hub:
            name, _, config = hub.partition(":")
            loaded = datasets.load_dataset(name, config or None, cache_dir=str(root))
        elif local(root):
            loaded = datasets.load_from_disk(str(root))
        else:
            loaded = datasets.load_dataset(str(root))  # a directory of parquet (or csv, json, image) files
    except Exception as exc:  # offline (ConnectionError), unknown name (DatasetNotFoundError), a broken file, ...
        hint = ("; offline, set HF_DATASETS_OFFLINE=1 to use what is already cached under --data, or save_to_disk "
                "it elsewhere and pass --dataset hf --data DIR") if hub else ""
        raise InputError(f"could not load {where} ({first_line(exc)}){hint}") from None
    if isinstance(loaded, datasets.Dataset):  # one saved split: the train split
        loaded = {"train": loaded}
    ours = {split: loaded[name] for split, names in SPLIT_NAMES.items()
            for name in [next((n for n in names if n in loaded), None)] if name is not None}
    if not ours:
        raise InputError(f"{where} has none of the splits train, validation, test (it has {', '.join(loaded)})")
    return ours


def column(features, wanted: str | None, kind: str, flag: str) -> str:
    """The column named `wanted`, else the first whose feature is a `kind` (Image, ClassLabel)."""
    found = [name for name, f in features.items() if type(f).__name__ == kind]
    if wanted is not None and wanted not in features:
        raise InputError(f"no column {wanted!r} (columns: {', '.join(features)})")
    if wanted is None and not found:
        described = ", ".join(f"{n} ({type(f).__name__})" for n, f in features.items())
        raise InputError(f"no {kind} column (columns: {described}): name it with {flag}")
    return wanted or found[0]


def suffix(data: bytes) -> str:
    """The file suffix of encoded image bytes, from their magic number (.webp: RIFF....WEBP)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((s for magic, s in MAGIC if data.startswith(magic)), ".img")


def export(ds, image: str, folder: Path) -> tuple[str, ...]:
    """Write every row's encoded image to `folder` (once; reused when complete) and list the files in row order."""
    if folder.is_dir():
        return tuple(str(folder / name) for name in (folder / "files.txt").read_text().splitlines())
    datasets = datasets_module()
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")  # one per process: torchrun ranks export at once
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names, raw = [], ds.cast_column(image, datasets.Image(decode=False)).select_columns([image]).with_format("arrow")
    for batch in raw.iter(batch_size=1000):
        cells = batch.column(image).combine_chunks()
        for data, path in zip(cells.field("bytes").to_pylist(), cells.field("path").to_pylist()):
            if data is None:  # a dataset that stores image paths, not bytes
                data = Path(path).read_bytes() if path and Path(path).is_file() else b""
            names.append(f"{len(names):08d}{suffix(data)}")
            (tmp / names[-1]).write_bytes(data)
    (tmp / "files.txt").write_text("".join(n + "\n" for n in names))
    try:
        tmp.rename(folder)
    except OSError:  # another rank finished first: its files are the same
        shutil.rmtree(tmp)
    return tuple(str(folder / n) for n in names)


@dataclass(frozen=True)
class HfSource:
    """A Hugging Face dataset: the hub's `hub` (None: `--data` itself), its columns named or found by type."""

    hub: str | None = None
    image_column: str | None = None
    label_column: str | None = None

    def splits(self, root: Path) -> tuple[str, ...]:
        return tuple(load(root, self.hub))

    def read(self, root: Path, splits: tuple[str, ...]) -> Dataset:
        loaded = load(root, self.hub)
        absent = [s for s in splits if s not in loaded]
        if absent:
            raise InputError(f"{self.hub or root} has no {absent[0]} split (it has {', '.join(loaded)})")
        features = next(iter(loaded.values())).features
        image = column(features, self.image_column, "Image", "--image-column")
        label = column(features, self.label_column, "ClassLabel", "--label-column")
        labels = {s: np.asarray(loaded[s].with_format("numpy")[label]) for s in loaded}
        if type(features[label]).__name__ == "ClassLabel":
            classes = tuple(features[label].names)
        else:  # integer labels: 0..max over every split, whichever are asked for
            top = max((int(y.max()) for y in labels.values() if y.size and np.issubdtype(y.dtype, np.integer)), default=0)
            classes = tuple(str(i) for i in range(top + 1))
        out = {}
        for s in splits:
            where = f"{self.hub or root} ({s}, column {label!r})"
            checked = checked_labels(labels[s], len(classes), where)
            if not len(checked):
                raise InputError(f"{self.hub or root}: the {s} split has no rows")
            files = export(loaded[s], image, root / EXPORT / f"{s}-{loaded[s]._fingerprint}")
            out[s] = Split(s, checked, files=files)
        return Dataset("hf", root, classes, out, source=PREFIX + self.hub if self.hub else "hf")

    def kind(self) -> SourceKind:
        return SourceKind("hf", "a Hugging Face save_to_disk directory (dataset_dict.json) or --dataset hf:NAME[:CONFIG]",
                          detect=local, splits=self.splits, read=self.read)


def source(kind: str, image_column: str | None = None, label_column: str | None = None) -> SourceKind:
    """The source for `--dataset hf` or `hf:NAME[:CONFIG]`."""
    hub = kind[len(PREFIX):] if kind.startswith(PREFIX) else None
    if hub is not None and not hub.split(":")[0]:
        raise InputError("--dataset hf:NAME[:CONFIG] needs a NAME (e.g. hf:uoft-cs/cifar10)")
    return HfSource(hub, image_column, label_column).kind()


KIND = source("hf")
