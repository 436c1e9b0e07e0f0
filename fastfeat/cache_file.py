"""Everything that touches the HDF5 feature cache.

Layout: `/<split>/features` (N, 512) float16|float32 and `/<split>/labels` (N,) int64, chunked
along rows, and for image folders `/<split>/files` (N,) the rows' image paths relative to the
dataset; the root attributes describe the backbone, weights, preprocessing and dataset.
Extra views (`fastfeat cache --tta flip --views N`) go to `/<split>/views` (N, V, D), same dtype, with
the attributes `transforms` and `seeds` (JSON lists: each view's transform and seed, null when not
random); readers that know only `features` read such a cache as before.
A cache is written as `<out>.partial`, batch by batch (each split's `rows_written` attribute
is updated after its rows are flushed), and renamed to `<out>` with `complete=True` at the end.
Its datasets are allocated and zero-filled when it is created, so a full disk fails then, before any work;
any write that still fails is one line, the file is closed and nothing more is written to it (HDF5 has
no way back from a failed write). The writer has no chunk cache: a failed row write raises where it is made,
not later inside a flush or a dataset's release, where HDF5 reaches a segmentation fault (and writes are no
slower without it: docs/results.md). Reading checks every dataset and attribute a reader relies on.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from .errors import FastfeatError, InputError
from .spec import FEATURE_DTYPES, FeatureSpec, plain

if TYPE_CHECKING:
    from concurrent.futures import Future

    import torch

CHUNK_ROWS = 1024


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def shard_path(out: Path, rank: int, world_size: int) -> Path:
    """Where rank `rank` of a torchrun job writes its rows before rank 0 joins them into `out`."""
    return out.with_name(f"{out.name}.rank{rank}-of-{world_size}")


class CacheWriter:
    """Writes one cache: creates or resumes `<out>.partial`, renames it to `out` on `finish()`.

    `attrs` must describe everything that determines the rows; a resumed file must have been
    started with the same `attrs`, split sizes and `split_files` (the rows' source files, if any).
    """

    def __init__(
        self,
        out: Path,
        attrs: dict,
        split_rows: dict[str, int],
        feature_dim: int,
        dtype: str = "float16",
        resume: bool = False,
        overwrite: bool = False,
        split_files: dict[str, list[str]] | None = None,
        split_views: dict[str, list[dict]] | None = None,
    ):
        if dtype not in FEATURE_DTYPES:
            raise InputError(f"unknown --dtype {dtype!r}: choose float16 or float32")
        self.out, self.tmp = Path(out), partial_path(Path(out))
        if self.out.exists() and not overwrite:
            raise InputError(f"{self.out} already exists (pass --overwrite to replace it)")
        self.attrs, self.split_files = file_attrs(attrs, split_rows, dtype), split_files or {}
        self.rows_done, self.resumed = 0, False  # rows this run wrote: a failed run that wrote none leaves no .partial behind
        self.split_views = {split: views for split, views in (split_views or {}).items() if views}
        self.resumed = self.tmp.exists() and resume
        if self.resumed:
            self.file = self._reopen()
        elif self.tmp.exists() and not overwrite:
            raise InputError(f"{self.tmp} is left from an interrupted run: pass --resume to continue it or --overwrite to start over")
        else:
            self.file = self._create(split_rows, feature_dim, dtype)

    def _create(self, split_rows: dict[str, int], feature_dim: int, dtype: str) -> h5py.File:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            f = h5py.File(self.tmp, "w", rdcc_nbytes=0)
        except OSError as exc:
            raise InputError(f"cannot write {self.tmp}: {exc.strerror or exc}") from None
        self.file = f
        with self._io():
            for key, value in self.attrs.items():
                f.attrs[key] = value
            f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.attrs["complete"] = False
            for split, n in split_rows.items():
                group = f.create_group(split)
                chunk = max(1, min(n, CHUNK_ROWS))
                group.create_dataset("features", (n, feature_dim), dtype=dtype, chunks=(chunk, feature_dim),
                                     dcpl=_reserved())
                group.create_dataset("labels", (n,), dtype="int64", chunks=(chunk,), dcpl=_reserved())
                if split in self.split_files:
                    group.create_dataset("files", data=self.split_files[split], dtype=h5py.string_dtype())
                if split in self.split_views:
                    _create_views(group, self.split_views[split], n, chunk, feature_dim, dtype)
                group.attrs["rows_written"] = 0
            f.flush()
        return f

    @contextmanager
    def _io(self):
        """HDF5 and file-system failures (a full disk, a size limit, an I/O error) as one line; the file is
        closed at once, since HDF5 cannot continue after a failed write."""
        try:
            yield
        except (OSError, RuntimeError, ValueError) as exc:
            _close(self.file)
            if not self.rows_done and not self.resumed:
                self.tmp.unlink(missing_ok=True)  # nothing computed yet: nothing to keep
            raise FastfeatError(f"cannot write {self.tmp}: {_reason(exc)}" + (
                "; free space and rerun with --resume to continue" if self.rows_done else "")) from None

    def _reopen(self) -> h5py.File:
        try:
            f = h5py.File(self.tmp, "r+", rdcc_nbytes=0)
        except OSError as exc:
            raise InputError(f"cannot resume {self.tmp} ({exc}): pass --overwrite to start over") from None
        try:
            _check_same_files(f, self.split_files)  # first: it names the split whose files differ
            _check_same_attrs(f, self.attrs)
        except InputError:
            f.close()
            raise
        return f

    def rows_written(self, split: str) -> int:
        return int(self.file[split].attrs["rows_written"])

    def write(self, split: str, start: int, features: np.ndarray, labels: np.ndarray,
              views: np.ndarray | None = None) -> None:
        """Write rows [start, start + len(features)) of `split` (and their (n, V, D) extra views, which a
        split with views requires) and record them as done."""
        group = self.file[split]
        stop = start + len(features)
        if ("views" in group) != (views is not None):
            raise FastfeatError(f"{self.tmp}: split {split} {'needs' if 'views' in group else 'has no'} views")
        with self._io():
            group["features"][start:stop] = features
            group["labels"][start:stop] = labels
            if views is not None:
                group["views"][start:stop] = views
            self.file.flush()
            group.attrs["rows_written"] = stop
            self.file.flush()
        self.rows_done += stop - start

    def finish(self) -> Path:
        """Check every split is full, mark the file complete and move it to its final name."""
        for split in self.file:
            if self.rows_written(split) != len(self.file[split]["labels"]):
                raise FastfeatError(f"{self.tmp}: split {split} is not fully written")
        with self._io():
            self.file.attrs["complete"] = True
            self.file.close()
            os.replace(self.tmp, self.out)
        return self.out

    def append_shards(self, shards: list[Path]) -> None:
        """Copy complete shard files' rows, in order, into this (empty) cache, chunk by chunk."""
        for split in self.file:
            row = 0
            for shard in shards:
                with h5py.File(shard, "r") as f:
                    features, labels, views = f[split]["features"], f[split]["labels"], f[split].get("views")
                    for start in range(0, len(labels), CHUNK_ROWS):
                        stop = min(len(labels), start + CHUNK_ROWS)
                        self.write(split, row + start, features[start:stop], labels[start:stop],
                                   None if views is None else views[start:stop])
                    row += len(labels)

    def close(self) -> None:
        """Close without finishing: a partial file with rows stays for `--resume`, an empty one goes."""
        if self.file.id.valid:
            empty = all(self.rows_written(split) == 0 for split in self.file)
            _close(self.file)
        else:
            empty = not self.rows_done and not self.resumed
        if empty:
            self.tmp.unlink(missing_ok=True)


def _reserved() -> h5py.h5p.PropDCID:
    """Dataset creation: every chunk allocated and zero-filled now, so the disk space is taken before the work."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    return dcpl


def _close(f: h5py.File) -> None:
    """Close `f` even after a failed write (h5py's first close then fails while releasing it)."""
    for _ in range(2):
        try:
            f.close()
            return
        except (OSError, RuntimeError, ValueError):
            pass


def _reason(exc: Exception) -> str:
    """The operating system's words from an HDF5 error ("File too large"), else the first line."""
    found = re.search(r"error message = '([^']+)'", str(exc))
    return found[1] if found else getattr(exc, "strerror", None) or str(exc).splitlines()[0]


def _create_views(group: h5py.Group, views: list[dict], rows: int, chunk: int, feature_dim: int, dtype: str) -> None:
    """`views` (rows, V, D), each view's transform and seed in its attributes."""
    data = group.create_dataset("views", (rows, len(views), feature_dim), dtype=dtype,
                                chunks=(chunk, len(views), feature_dim), dcpl=_reserved())
    data.attrs["transforms"] = json.dumps([v["transform"] for v in views])
    data.attrs["seeds"] = json.dumps([v["seed"] for v in views])


def file_attrs(attrs: dict, split_rows: dict[str, int], dtype: str) -> dict:
    """Everything a cache (or shard) records about how its rows were made."""
    return {**attrs, "feature_dtype": dtype, "rows": json.dumps(split_rows)}


def _check_same_attrs(f: h5py.File, expected: dict) -> None:
    changed = sorted(k for k, v in expected.items() if plain(f.attrs.get(k)) != plain(v))
    if changed:
        raise InputError(
            f"cannot resume {f.filename}: it was made with different {', '.join(changed)} (pass --overwrite to start over)"
        )


def _check_same_files(f: h5py.File, split_files: dict[str, list[str]]) -> None:
    for split, files in split_files.items():
        if split not in f or "files" not in f[split] or f[split]["files"].asstr()[:].tolist() != list(files):
            raise InputError(
                f"cannot resume {f.filename}: its {split} image files differ from the dataset's now "
                "(pass --overwrite to start over)"
            )


def finished_shard(path: Path, attrs: dict, split_rows: dict[str, int], dtype: str,
                   split_files: dict[str, list[str]]) -> bool:
    """Whether `path` is a complete shard made with these settings (a resumed torchrun job keeps it)."""
    if not path.exists():
        return False
    with h5py.File(path, "r") as f:
        _check_same_files(f, split_files)
        _check_same_attrs(f, file_attrs(attrs, split_rows, dtype))
        return bool(f.attrs.get("complete"))


def _check_finite(path: Path, name: str, features: np.ndarray, rows: np.ndarray | None = None) -> None:
    """Refuse nan or inf features (an fp16 overflow, a damaged file): a head would train on them to nan.
    `rows`: the file rows of `features` when they are not the split's first ones (a block)."""
    if np.isfinite(features).all():  # the common case, at a fraction of the cost of finding the rows
        return
    bad = np.flatnonzero(~np.isfinite(features.reshape(len(features), -1)).all(axis=1))
    if len(bad):
        first = bad[0] if rows is None else rows[bad].min()
        raise InputError(f"{path}: {name} hold nan or inf in {len(bad)} row(s), the first is row {first}; "
                         "rebuild the cache (with --dtype float32 if float16 overflowed)")


def _as_float32(array: np.ndarray) -> np.ndarray:
    """`array` as float32, the dtype heads train in: torch converts float16 several times faster than numpy
    (docs/results.md); float32 arrays are returned as they are."""
    import torch

    return torch.from_numpy(array).float().numpy()


@dataclass(frozen=True)
class CacheData:
    """A complete cache in memory: per split `features` (N, D) float32 and `labels` (N,) int64, and
    for image folders `files`, each row's image path relative to `attrs["dataset_path"]`; when asked for,
    the splits' extra `views` (N, V, D) in their stored dtype and `view_names` (each view's transform)."""

    path: Path
    attrs: dict
    features: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    files: dict[str, list[str]]
    views: dict[str, np.ndarray] = field(default_factory=dict)
    view_names: dict[str, list[str]] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return json.loads(self.attrs["classes"])


def check_complete(path: str | Path) -> None:
    """A one-line InputError unless `path` is a complete fastfeat cache: what a reader checks before any size
    or split is asked of it."""
    path = Path(path)
    if not path.is_file():
        hint = f" ({partial_path(path).name} exists: finish it with fastfeat cache --resume)" if partial_path(path).exists() else ""
        raise InputError(f"cache {path} does not exist{hint}")
    f, attrs = _open_cache(path)
    with f:
        if not attrs.get("complete"):
            raise InputError(f"{path} is an incomplete cache (finish it with fastfeat cache --resume)")


def read_cache(path: str | Path, splits: tuple[str, ...] | None = ("train", "test"), views: bool = False) -> CacheData:
    """Load the `splits` (None: every split it holds) of a complete fastfeat cache (with `views`, their extra
    views too), or fail in one line saying what is wrong with it."""
    path = Path(path)
    check_complete(path)
    f, attrs = _open_cache(path)
    with f, _reading(path):
        features, labels, files = {}, {}, {}
        splits = tuple(f) if splits is None else splits
        for split in splits:
            if split not in f or "features" not in f[split] or "labels" not in f[split]:
                raise InputError(f"{path} has no {split}/features and {split}/labels")
            features[split] = _as_float32(f[split]["features"][:])
            labels[split] = f[split]["labels"][:]
            if "files" in f[split]:
                files[split] = f[split]["files"].asstr()[:].tolist()
            if features[split].ndim != 2 or len(features[split]) != len(labels[split]):
                raise InputError(f"{path}: {split}/features and {split}/labels do not match in shape")
            _check_labels(path, split, labels[split], len(json.loads(attrs["classes"])))
            if split in files and len(files[split]) != len(labels[split]):
                raise InputError(f"{path}: {split}/files has {len(files[split])} rows, {split}/labels {len(labels[split])}")
            recorded = attrs.get("feature_dim", features[split].shape[1])
            if features[split].shape[1] != recorded:
                raise InputError(f"{path}: {split} features are {features[split].shape[1]}-d, the cache records {recorded}")
            _check_finite(path, f"{split}/features", features[split])
        extra = {split: _read_views(path, f[split], split, features[split].shape) for split in splits if views}
    return CacheData(path, attrs, features, labels, files, {s: v for s, (v, _) in extra.items() if v is not None},
                     {s: names for s, (v, names) in extra.items() if v is not None})


def read_views(path: str | Path, splits: tuple[str, ...]) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Only the extra views of those of `splits` that have them (see `read_cache`), for a reader that
    has the features already."""
    f, _ = _open_cache(Path(path))
    with f, _reading(Path(path)):
        found = {split: _read_views(Path(path), f[split], split, f[split]["features"].shape)
                 for split in splits if split in f}
    return {split: (views, names) for split, (views, names) in found.items() if views is not None}


def _read_views(path: Path, group: h5py.Group, split: str, shape: tuple[int, int]) -> tuple[np.ndarray | None, list[str]]:
    """A split's (N, V, D) views as stored (float16 stays float16) and their transforms; (None, []) if none."""
    if "views" not in group:
        return None, []
    data = group["views"]
    names = json.loads(data.attrs.get("transforms", "[]"))
    if data.ndim != 3 or (data.shape[0], data.shape[2]) != shape or len(names) != data.shape[1]:
        raise InputError(f"{path}: {split}/views {data.shape} do not match {split}/features {shape} "
                         f"and its {len(names)} named transforms")
    views = data[:]
    _check_finite(path, f"{split}/views", views)
    return views, names


def view_names(path: str | Path) -> dict[str, list[str]]:
    """Each split's extra views' transforms, without reading the views (splits without views left out)."""
    f, _ = _open_cache(Path(path))
    with f, _reading(Path(path)):
        return {split: json.loads(group["views"].attrs.get("transforms", "[]")) for split, group in f.items()
                if "views" in group}


def cached_splits(path: str | Path) -> list[str]:
    """The splits a cache file holds (a folder's own val split among them)."""
    f, _ = _open_cache(Path(path))
    with f:
        return list(f)


def split_files(path: str | Path, split: str) -> list[str] | None:
    """The image paths of a split's rows (relative to the dataset), or None for array datasets."""
    f, _ = _open_cache(Path(path))
    with f:
        return f[split]["files"].asstr()[:].tolist() if split in f and "files" in f[split] else None


def _check_labels(path: Path, split: str, labels: np.ndarray, classes: int) -> None:
    """Labels are one integer per row in [0, classes): anything else would index past the head's outputs."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{path}: {split}/labels must be 1-d integers, got {labels.dtype} of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise InputError(f"{path}: {split}/labels are outside 0..{classes - 1} (the cache's {classes} classes): "
                         f"they hold {labels.min()}..{labels.max()}")


@contextmanager
def _reading(path: Path):
    """HDF5 read errors (a damaged file) as one line."""
    try:
        yield
    except (OSError, RuntimeError, KeyError) as exc:
        raise InputError(f"{path} is damaged ({str(exc).splitlines()[0]}): re-create it with fastfeat cache") from None


def _open_cache(path: Path) -> tuple[h5py.File, dict]:
    """The open file and its attributes as plain values, or a one-line error if it is no fastfeat cache."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path} is not an HDF5 file") from None
    attrs = {key: plain(value) for key, value in f.attrs.items()}
    if "fastfeat_version" not in attrs or "classes" not in attrs:
        f.close()
        raise InputError(f"{path} is not a fastfeat cache (no fastfeat attributes)")
    try:
        classes = json.loads(attrs["classes"])
    except (TypeError, ValueError):
        classes = None
    if not isinstance(classes, list):
        f.close()
        raise InputError(f"{path}: its classes attribute is not a JSON list of names: re-create it with fastfeat cache")
    return f, attrs


def describe_cache(path: str | Path) -> dict:
    """What a cache holds, complete or not, without reading its features: the attributes, and per split
    its rows, the rows written so far and the stored feature dtype."""
    f, attrs = _open_cache(Path(path))
    with f, _reading(Path(path)):
        splits = {name: {"rows": len(group["labels"]), "rows_written": int(group.attrs["rows_written"]),
                         "features": f"{tuple(group['features'].shape)} {group['features'].dtype}",
                         "bytes": _stored_bytes(group),
                         **_describe_views(group)}
                  for name, group in f.items()}
    return {"kind": "cache", "complete": bool(attrs.get("complete")),
            "spec": FeatureSpec.from_attrs(attrs, str(path)).to_attrs(), "classes": json.loads(attrs["classes"]),
            "splits": splits, **{key: attrs.get(key) for key in ("precision_reason", "dataset", "dataset_path", "created",
                                                       "fastfeat_version")}}


def _stored_bytes(group: h5py.Group) -> int:
    """The bytes a split's datasets hold as stored (uncompressed): what reading it whole costs."""
    return sum(data.size * data.dtype.itemsize for data in group.values() if isinstance(data, h5py.Dataset))


def _describe_views(group: h5py.Group) -> dict:
    if "views" not in group:
        return {}
    data = group["views"]
    return {"views": f"{tuple(data.shape)} {data.dtype}", "view_transforms": json.loads(data.attrs["transforms"]),
            "view_seeds": json.loads(data.attrs["seeds"])}


Range = tuple[int, int]  # file rows [start, stop)

# A gathered block is up to PIECES_PER_BLOCK pieces, so a batch drawn from it mixes rows from as many places of
# the file, but no piece is under MIN_PIECE_BYTES of stored features: each piece is one read call, and a call's
# fixed cost would outweigh the copy of fewer bytes.
PIECES_PER_BLOCK = 256
MIN_PIECE_BYTES = 16 * 1024


def piece_rows(block_rows: int, chunk: int, row_bytes: int) -> int:
    """Rows a piece of a gathered block: the block cut into PIECES_PER_BLOCK equal pieces, or into fewer where
    a piece of `row_bytes` rows would be under MIN_PIECE_BYTES; whole file chunks of `chunk` rows where a chunk
    fits (every chunk then read whole, as a file-order pass reads it)."""
    pieces = max(1, min(PIECES_PER_BLOCK, block_rows * row_bytes // MIN_PIECE_BYTES))
    rows = block_rows // pieces
    return rows // chunk * chunk if rows >= chunk else rows


@dataclass(frozen=True)
class Block:
    """Rows of a split: `rows` (n,) int64 their file rows (one contiguous range in a file-order pass, pieces
    from all over the file in a gathered block), `features` (n, D) float32, `labels` (n,) int64 and, when read
    with views, `views` (n, V, D) float32, all on the reader's device."""

    rows: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    views: torch.Tensor | None = None

    def local(self, mask: torch.Tensor) -> torch.Tensor:
        """The places in this block of the rows `mask` (a bool per file row) marks, in the block's order."""
        return mask[self.rows].nonzero().squeeze(1)


class BlockReader:
    """A split of a complete cache read as row blocks of at most `block_rows` rows (a multiple of the file's
    own row chunks, so every chunk is read once per pass, or a contiguous part of one under a tiny budget):
    contiguous ones in file order (`blocks`), or blocks gathered from several row ranges each (`gathered`, of
    `pieces`, `pieces_per_block` at a time), so a block mixes rows from all over the file at no more memory.
    Rows are read straight from their bytes where HDF5 stores them plain (`_FileRows`), else through h5py
    without its chunk cache (which would read, and evict, whole chunks for pieces smaller than one). Where a
    core is free for it (`runtime.core_to_spare`), the next block is read (and converted to float32, into
    pinned memory for a GPU) in a background thread while the caller works on the current one. The one
    reader of features under a memory budget: heads, sweep and kNN take blocks."""

    def __init__(self, path: str | Path, split: str, block_rows: int, device: torch.device | str = "cpu",
                 views: bool = False):
        import torch

        from .runtime import core_to_spare

        self.path, self.split, self.device = Path(path), split, torch.device(device)
        self.read_ahead = core_to_spare(self.device)
        f, _ = _open_cache(self.path)
        with f:
            if split not in f or "features" not in f[split] or "labels" not in f[split]:
                raise InputError(f"{self.path} has no {split}/features and {split}/labels")
            data = f[split]["features"]
            self.rows, self.dim = data.shape
            self._labels = f[split]["labels"][:]
            chunk = data.chunks[0] if data.chunks else 1
            row_bytes = self.dim * data.dtype.itemsize
            self.views = views and "views" in f[split]
            self.view_names = json.loads(f[split]["views"].attrs.get("transforms", "[]")) if self.views else []
            self._places = {name: _FileRows.of(f[split][name], self.path) for name in self._names()}
        self.block_rows = block_rows // chunk * chunk if block_rows >= chunk else max(1, block_rows)
        self.piece_rows = piece_rows(self.block_rows, chunk, row_bytes)
        self.pieces_per_block = self.block_rows // self.piece_rows

    def with_views(self) -> BlockReader:
        """This reader if it reads the views, else one of the same blocks that does."""
        return self if self.views else BlockReader(self.path, self.split, self.block_rows, self.device, views=True)

    @property
    def pieces(self) -> list[Range]:
        """The split cut into ranges of `piece_rows` rows (the last one may be short), in file order."""
        return [(start, min(self.rows, start + self.piece_rows)) for start in range(0, self.rows, self.piece_rows)]

    def labels(self) -> np.ndarray:
        """Every row's label (8 bytes a row: small beside the features, so held in memory, and a block's
        labels are taken from them rather than read piece by piece)."""
        return self._labels

    def blocks(self) -> Iterator[Block]:
        """Every row once, in contiguous blocks in file order, one read ahead."""
        return self.gathered([[(start, min(self.rows, start + self.block_rows))]
                              for start in range(0, self.rows, self.block_rows)])

    def gathered(self, groups: list[list[Range]]) -> Iterator[Block]:
        """One block per group, its ranges' rows concatenated in the group's order (a group holds at most
        `block_rows` rows), one read ahead. A block is valid until the next one is drawn: the blocks of a
        pass take turns in two buffers (callers copy what they keep)."""
        from concurrent.futures import ThreadPoolExecutor

        with h5py.File(self.path, "r", rdcc_nbytes=0) as f, open(self.path, "rb", buffering=0) as raw, \
                ThreadPoolExecutor(1, thread_name_prefix="fastfeat-read") as pool:
            group = f[self.split]
            size = min(self.rows, max((sum(b - a for a, b in ranges) for ranges in groups), default=0))
            source = _Pass(group, self._places, raw.fileno(), self._staging(group, size))
            slots = [self._slot(group, size) for _ in range(2)]
            submit = pool.submit if self.read_ahead else _run_now
            read = lambda i: submit(self._read, source, groups[i], slots[i % 2])  # noqa: E731
            pending = read(0) if groups else None
            for i in range(len(groups)):
                block = pending.result()
                pending = read(i + 1) if i + 1 < len(groups) else None
                yield self._to_device(block, slots[i % 2])

    def _names(self) -> tuple[str, ...]:
        return ("features",) + (("views",) if self.views else ())

    def _slot(self, group: h5py.Group, rows: int) -> _Slot:
        """Float32 host buffers for `rows` rows of each read dataset (pinned for a GPU)."""
        import torch

        pinned = self.device.type == "cuda"
        empty = lambda name: torch.empty(rows, *group[name].shape[1:], pin_memory=pinned)  # noqa: E731
        return _Slot({name: empty(name) for name in self._names()})

    def _staging(self, group: h5py.Group, rows: int) -> dict[str, np.ndarray | None]:
        """Per read dataset, the stored-dtype buffer its rows are read into before conversion (one read
        is in flight at a time, so both slots share it); None where the file holds float32."""
        return {name: None if group[name].dtype == np.float32 else
                np.empty((rows, *group[name].shape[1:]), dtype=group[name].dtype) for name in self._names()}

    def _read(self, source: _Pass, ranges: list[Range], slot: _Slot) -> Block:
        """One block from the file into `slot`, as float32 host tensors."""
        import torch

        rows = np.concatenate([np.arange(start, stop) for start, stop in ranges])
        if slot.copied is not None:
            slot.copied.synchronize()  # its last block's copy to the GPU has finished
        arrays, staging = {}, source.staging
        for name, buffer in slot.buffers.items():
            dest = buffer[:len(rows)]
            raw = dest.numpy() if staging[name] is None else staging[name][:len(rows)]
            source.read(name, ranges, raw)
            if staging[name] is not None:
                dest.copy_(torch.from_numpy(raw))
            if not torch.isfinite(dest.sum()):  # a sum is finite where every value is (an overflow: see the rows)
                _check_finite(self.path, f"{self.split}/{name} of a streamed block", dest.numpy(), rows)
            arrays[name] = dest
        return Block(torch.from_numpy(rows), arrays["features"], torch.from_numpy(self._labels[rows]),
                     arrays.get("views"))

    def _to_device(self, block: Block, slot: _Slot) -> Block:
        import torch

        if self.device.type == "cpu":
            return block
        move = lambda t: None if t is None else t.to(self.device, non_blocking=True)  # noqa: E731
        moved = Block(move(block.rows), move(block.features), move(block.labels), move(block.views))
        slot.copied = torch.cuda.Event()
        slot.copied.record()
        return moved


def _run_now(fn: Callable[..., Block], *args) -> Future:
    """`fn(*args)` run at once, as a done future: a pool's `submit` without the pool."""
    from concurrent.futures import Future

    done: Future = Future()
    done.set_result(fn(*args))
    return done


@dataclass
class _Slot:
    """Host memory a block of a pass is read into, reused by every other block: a fresh tensor of a block's
    size each time costs page faults that take longer than reading it (docs/results.md). `copied`: on a GPU,
    the event of its last copy there, waited for before it is rewritten."""

    buffers: dict[str, torch.Tensor]
    copied: torch.cuda.Event | None = None


@dataclass(frozen=True)
class _Pass:
    """What one pass over a split reads with: its open group, each dataset's `_FileRows` (None: read through
    h5py), the file descriptor they read from, and the stored-dtype staging buffers (`_staging`)."""

    group: h5py.Group
    places: dict[str, _FileRows | None]
    fd: int
    staging: dict[str, np.ndarray | None]

    def read(self, name: str, ranges: list[Range], out: np.ndarray) -> None:
        place = self.places[name]
        if place is None:
            _read_ranges(self.group[name], ranges, out)
        else:
            place.read(self.fd, ranges, out)


@dataclass(frozen=True)
class _FileRows:
    """Where a dataset's rows lie in its file when HDF5 stores them as plain bytes (no filters, native byte
    order, chunks of whole rows, or one contiguous run): `offsets[c]`, the byte offset of chunk c of
    `chunk_rows` rows. A range of rows is then one `os.preadv` straight into the block per chunk it
    touches; through h5py, each small piece of a gathered block costs several times more (docs/results.md)."""

    path: Path
    offsets: np.ndarray
    chunk_rows: int
    row_bytes: int

    @classmethod
    def of(cls, data: h5py.Dataset, path: Path) -> _FileRows | None:
        """The rows' places, checked against the file's size; None where the layout is not plain bytes."""
        if not data.dtype.isnative or data.id.get_create_plist().get_nfilters() or not len(data):
            return None
        row_bytes = data.dtype.itemsize * int(np.prod(data.shape[1:]))
        if data.chunks is None:
            offset = data.id.get_offset()
            offsets, chunk_rows = np.array([-1 if offset is None else offset], dtype=np.int64), len(data)
        elif tuple(data.chunks[1:]) == tuple(data.shape[1:]):
            chunk_rows = data.chunks[0]
            offsets = np.full(-(-len(data) // chunk_rows), -1, dtype=np.int64)
            record = lambda info: offsets.__setitem__(info.chunk_offset[0] // chunk_rows, info.byte_offset)  # noqa: E731
            if hasattr(data.id, "chunk_iter"):  # one call (HDF5 1.12.3 and later)
                data.id.chunk_iter(record)
            else:
                for i in range(data.id.get_num_chunks()):
                    record(data.id.get_chunk_info(i))
        else:
            return None
        if (offsets < 0).any() or offsets.max() + chunk_rows * row_bytes > path.stat().st_size:
            return None  # unwritten chunks (fill values) or an index past the end: HDF5 decides, or refuses
        return cls(path, offsets, chunk_rows, row_bytes)

    def read(self, fd: int, ranges: list[Range], out: np.ndarray) -> None:
        """The rows of `ranges`, concatenated into `out` (C-contiguous, the stored dtype)."""
        view, at = memoryview(out.reshape(-1).view(np.uint8)), 0
        for start, stop in ranges:
            while start < stop:
                chunk = start // self.chunk_rows
                end = min(stop, (chunk + 1) * self.chunk_rows)
                size = (end - start) * self.row_bytes
                offset = int(self.offsets[chunk]) + (start - chunk * self.chunk_rows) * self.row_bytes
                if os.preadv(fd, [view[at:at + size]], offset) != size:
                    raise InputError(f"{self.path} ends inside rows its index lists: the file is damaged or "
                                     "was truncated while read; rebuild the cache")
                at, start = at + size, end


def _read_ranges(data: h5py.Dataset, ranges: list[Range], out: np.ndarray) -> None:
    """The rows of `ranges` of `data`, concatenated into `out`: one contiguous read a range (a hyperslab
    union would be one call, but HDF5 walks such a selection far slower than separate reads; for small
    ranges slicing costs less per call than `read_direct`, which a single range uses to skip a copy)."""
    if len(ranges) == 1:
        data.read_direct(out, np.s_[ranges[0][0]:ranges[0][1]], np.s_[:len(out)])
        return
    at = 0
    for start, stop in ranges:
        out[at:at + stop - start] = data[start:stop]
        at += stop - start


def split_shape(path: str | Path, split: str, views: bool = False) -> tuple[int, int]:
    """(rows, values a row) of a split's features (and views)."""
    f, _ = _open_cache(Path(path))
    with f:
        group = f[split]
        rows, dim = group["features"].shape
        return rows, dim * (1 + (group["views"].shape[1] if views and "views" in group else 0))


def split_bytes(path: str | Path, split: str, views: bool = False) -> int:
    """Bytes a split's features (and views) take in memory as float32, the form training holds them in."""
    f, _ = _open_cache(Path(path))
    with f:
        if split not in f:
            return 0
        group = f[split]
        arrays = [group["features"]] + ([group["views"]] if views and "views" in group else [])
        return sum(int(np.prod(a.shape)) * 4 for a in arrays) + 8 * len(group["labels"])


def read_attrs(path: str | Path) -> dict:
    """A cache's root attributes as plain values (complete or not), without reading its features."""
    f, attrs = _open_cache(Path(path))
    f.close()
    return attrs


def write_subset(data: CacheData, out: Path, splits: dict[str, tuple[str, np.ndarray]], attrs: dict) -> Path:
    """A cache of chosen rows of the cache `data`: new split `name` holds rows `rows` of its split `source`
    (`splits[name] = (source, rows)`), with their image paths, in the stored dtype; `attrs` are added to its
    attributes (what the subset is). Written as any cache is: `.partial`, then renamed."""
    dtype = str(data.attrs.get("feature_dtype", "float16"))
    rows = {name: len(index) for name, (_, index) in splits.items()}
    files = {name: [data.files[source][i] for i in index] for name, (source, index) in splits.items()
             if source in data.files}
    base = {k: v for k, v in data.attrs.items() if k not in ("complete", "created", "rows", "feature_dtype")}
    writer = CacheWriter(out, {**base, **attrs}, rows, int(data.attrs["feature_dim"]), dtype, overwrite=True,
                         split_files=files)
    try:
        for name, (source, index) in splits.items():
            writer.write(name, 0, data.features[source][index].astype(dtype), data.labels[source][index])
        return writer.finish()
    finally:
        writer.close()
