"""File lists: `root/{train,val,test}.csv` (or `.tsv`) of `path,label` rows, paths relative to the list file.

Labels are class names or integers. Class names: `classes.txt` (one a line) beside the lists when there
is one, else the sorted names found in the lists (integer labels: `0..max`). Rows keep the list's order.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import InputError
from .base import SPLITS, Dataset, SourceKind, Split, checked_labels

SUFFIXES = {".csv": ",", ".tsv": "\t"}
HEADER = ("path", "label")


def list_file(root: Path, split: str) -> Path | None:
    """`root/<split>.csv` or `.tsv`, whichever is there."""
    return next((root / f"{split}{s}" for s in SUFFIXES if (root / f"{split}{s}").is_file()), None)


def list_splits(root: Path) -> tuple[str, ...]:
    return tuple(s for s in SPLITS if list_file(root, s) is not None)


def read_rows(path: Path) -> list[tuple[str, str]]:
    """The (path, label) rows of one list; a `path,label` header row is skipped."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [tuple(cell.strip() for cell in row) for row in csv.reader(f, delimiter=SUFFIXES[path.suffix])
                    if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"unreadable file list {path}: {exc}") from None
    if rows and tuple(c.lower() for c in rows[0]) == HEADER:
        rows = rows[1:]
    for number, row in enumerate(rows, 1):
        if len(row) != 2 or not all(row):
            raise InputError(f"{path}: row {number} is not `path,label`: {SUFFIXES[path.suffix].join(row)!r}")
    if not rows:
        raise InputError(f"{path} lists no images")
    return rows


def class_names(root: Path, labels: list[str], names_files: tuple[str, ...] = ("classes.txt",)) -> tuple[str, ...]:
    """The first of `names_files` in `root` (one class a line), else the names the labels use (integers: 0..max)."""
    names = next((root / name for name in names_files if (root / name).is_file()), None)
    if names is not None:
        return tuple(line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip())
    if all(label.isdigit() for label in labels):
        return tuple(str(i) for i in range(max(map(int, labels)) + 1))
    return tuple(sorted(set(labels)))


def read_list(root: Path, splits: tuple[str, ...]) -> Dataset:
    """Every list of `root` read (so that the class names do not depend on which splits are asked for);
    the splits asked for returned, each file checked to exist."""
    lists = {s: read_rows(list_file(root, s)) for s in list_splits(root)}
    missing = [s for s in splits if s not in lists]
    if missing:
        raise InputError(f"{root} has no {' or '.join(f'{missing[0]}{s}' for s in SUFFIXES)} for split {missing[0]!r}")
    classes = class_names(root, [label for rows in lists.values() for _, label in rows])
    index = {name: i for i, name in enumerate(classes)}
    out = {}
    for split in splits:
        where = str(list_file(root, split))
        files = tuple(str(root / path) for path, _ in lists[split])
        absent = next((f for f in files if not Path(f).is_file()), None)
        if absent is not None:
            raise InputError(f"{where}: listed image {absent} does not exist")
        labels = [index.get(label, int(label) if label.isdigit() else -1) for _, label in lists[split]]
        unknown = next((label for (_, label), i in zip(lists[split], labels) if i < 0), None)
        if unknown is not None:
            raise InputError(f"{where}: label {unknown!r} is not one of the {len(classes)} classes "
                             f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
        out[split] = Split(split, checked_labels(labels, len(classes), where), files=files)
    return Dataset("list", root, classes, out, source=",".join(Path(list_file(root, s)).name for s in splits))


KIND = SourceKind(
    "list", "train.csv and test.csv (or .tsv; val.csv too) of path,label rows; classes.txt optional",
    detect=lambda root: bool(list_splits(root)), splits=list_splits, read=read_list,
)
