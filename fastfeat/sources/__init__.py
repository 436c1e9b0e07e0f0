"""Data sources: one table from `--dataset` name to the kind of source that reads it.

Every kind (one module each) satisfies `SourceKind`: which splits a root has, and how to read them
into ordered `Split`s with class names. `open_dataset` picks the kind from the table (or detects it),
checks the labels, and draws the --limit subset the same way for every kind.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import cifar, filelist, folder, hf, webdataset, zoo
from .base import (IMAGE_SUFFIXES, SPLITS, Dataset, SourceInputs, SourceKind, Split, TarMembers, balanced_rows,
                   checked_labels, few_shot_rows, stratified_holdout, visible)
from .cifar import CIFAR10, CIFAR_LAYOUTS, CifarLayout, download_cifar, read_cifar
from .folder import FOLDER_SPLIT_DIRS, read_folder

# in --dataset auto's order: a save_to_disk directory has train/ and test/ folders too, and webdataset's
# <split>/*.tar folders would pass for (empty) class folders
KINDS: dict[str, SourceKind] = {kind.name: kind for kind in (*cifar.KINDS, hf.KIND, webdataset.KIND, folder.KIND,
                                                             filelist.KIND, *zoo.KINDS)}


class DatasetNames(tuple):
    """The --dataset choices: the table's names, and hf:NAME[:CONFIG] for any Hugging Face hub dataset."""

    def __contains__(self, name: object) -> bool:
        return (isinstance(name, str) and name.startswith(hf.PREFIX)) or super().__contains__(name)


DATASET_KINDS = DatasetNames(("auto", *KINDS))

__all__ = ["CIFAR10", "CIFAR_LAYOUTS", "DATASET_KINDS", "FOLDER_SPLIT_DIRS", "IMAGE_SUFFIXES", "KINDS", "SPLITS",
           "CifarLayout", "Dataset", "SourceInputs", "SourceKind", "Split", "TarMembers", "balanced_rows", "checked_labels", "dataset_splits",
           "detect_kind", "download_cifar", "few_shot_rows", "open_dataset", "source_for", "read_cifar", "read_folder", "rows_sha256",
           "stratified_holdout", "visible"]


def open_dataset(
    root: str | Path,
    kind: str = "auto",
    splits: tuple[str, ...] | None = ("train", "test"),
    limit: int | None = None,
    download: bool = False,
    seed: int = 0,
    inputs: SourceInputs = SourceInputs(),
) -> Dataset:
    """Open `root` as the source kind `kind` (see `KINDS`; auto: whichever layout `root` holds; a shard
    pattern, or `inputs` naming per-split data: webdataset; hf:NAME[:CONFIG]: that Hugging Face hub dataset,
    fetched into `root` on first use, as `datasets` does, `download` or not);
    `limit` keeps a class-balanced subset of at most that many rows per split (see `balanced_rows`).
    `download` fetches a downloadable kind first (auto: CIFAR-10). `splits` None: every split it has.
    `inputs.columns`: a Hugging Face dataset's (image, label) columns (None: found by their feature types)."""
    if kind == "auto" and (inputs.split_data or webdataset.is_pattern(str(root))):
        kind = webdataset.KIND.name
    if kind == webdataset.KIND.name:
        root, inputs = webdataset.input_root(str(root), inputs)
    root = Path(root)
    unknown = set(splits or ()) - set(SPLITS)
    if unknown or splits == ():
        raise InputError(f"unknown split(s) {sorted(unknown)}: choose from {','.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if kind not in DATASET_KINDS:
        raise InputError(f"unknown dataset {kind!r}: choose from {', '.join(DATASET_KINDS)}, {hf.PREFIX}NAME[:CONFIG]")
    if kind.startswith(hf.PREFIX):
        root.mkdir(parents=True, exist_ok=True)  # the hub dataset's cache
    elif download:
        kind = "cifar10" if kind == "auto" else kind
        fetch = KINDS[kind].download
        if fetch is None:
            downloadable = " or ".join(k.name for k in KINDS.values() if k.download)
            raise InputError(f"--download only applies to --dataset {downloadable}")
        fetch(root)
    if not root.is_dir():
        raise InputError(f"data directory {root} does not exist (use --download for CIFAR-10)")
    source = source_for(detect_kind(root) if kind == "auto" else kind, inputs.columns)
    if inputs.given():
        if source.bind is None:
            takes = " or ".join(k.name for k in KINDS.values() if k.bind)
            raise InputError(f"--train-data, --test-data and --label-key apply to --dataset {takes}, not {source.name}")
        source = source.bind(inputs)
    has = source.splits(root)
    splits = has if splits is None else splits
    if "val" in splits and "val" not in has:
        what = "no val/ beside its test/ (a lone val/ is its test split)" if source.name == "folder" else "no val split"
        raise InputError(f"{root} has {what}: cache train,test; train-head holds out --val-fraction of train instead")
    dataset = source.read(root, splits)
    for split in dataset.splits.values():
        checked_labels(split.labels, len(dataset.classes), f"{root} ({split.name})")
    if limit is not None:
        if limit < len(dataset.classes):
            raise InputError(f"--limit {limit} is smaller than the {len(dataset.classes)} classes: "
                             "a subset must hold every class")
        subsets = {n: s.take(balanced_rows(s.labels, limit, seed)) for n, s in dataset.splits.items()}
        dataset = replace(dataset, splits=subsets)
    return dataset


def source_for(kind: str, columns: tuple[str | None, str | None] = (None, None)) -> SourceKind:
    """The table's entry for `kind`, or the Hugging Face source it names (`columns`: its image, label columns)."""
    return hf.source(kind, *columns) if hf.is_hf(kind) else KINDS[kind]


def dataset_splits(root: Path, kind: str) -> tuple[str, ...]:
    """The splits the dataset of kind `kind` at `root` has."""
    return source_for(kind).splits(root)


def detect_kind(root: Path) -> str:
    """The layout `root` holds: a CIFAR release folder, else class folders, else file lists; both CIFARs
    is ambiguous."""
    found = [layout for layout in CIFAR_LAYOUTS.values() if (root / layout.dir).is_dir()]
    if len(found) > 1:
        raise InputError(f"{root} holds both {' and '.join(f'{f.dir}/' for f in found)}: pass "
                         f"{' or '.join(f'--dataset {f.kind}' for f in found)} to say which")
    detected = next((k.name for k in KINDS.values() if k.detect(root)), None)
    if detected is None:
        raise InputError(
            f"{root} holds neither {' nor '.join(k.layout for k in KINDS.values())} "
            "(use --download for CIFAR-10, or --dataset to say which layout)"
        )
    return detected


def rows_sha256(dataset: Dataset) -> str:
    """A digest of what every split lists, in order (labels, and file paths relative to the root), so that
    --resume can tell a changed source from the same one."""
    digest = hashlib.sha256()
    for name, split in dataset.splits.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(split.labels, dtype="<i8").tobytes())
        for path in split.files or ():
            digest.update(str(Path(path).relative_to(dataset.root)).encode() + b"\0")
    return digest.hexdigest()
