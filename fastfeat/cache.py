"""`fastfeat cache`: one pass of the frozen backbone over a dataset into an HDF5 feature cache."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .backbone import Backbone, FeatureExtractor
from .cache_file import CacheWriter, finished_shard, shard_path
from .distributed import World, all_reduce_sum, barrier, init_world, shard_range
from .errors import FastfeatError, InputError
from .loaders import center_and_decoded_batches, eval_batches, resolve_loader
from .outputs import OutputLock, check_output
from .reporting import progress
from .runtime import choose_precision, compile_wanted, host_arrays
from .settings import CacheOptions
from .sources import Dataset, Split, open_dataset, rows_sha256
from .spec import FeatureSpec
from .transforms import Preprocess
from .views import NO_VIEWS, ViewPlan


@dataclass
class CacheResult:
    out: Path
    images: int
    seconds: float
    loader: str
    device: str
    precision: str
    size_bytes: int
    rows: dict[str, int] = field(default_factory=dict)
    ranks: int = 1
    views: int = 0  # extra view features computed (flips and augmented views), beside `images` center crops
    precision_reason: str = ""
    compiled: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict:
        return {
            "command": "cache",
            "images": self.images,
            "views": self.views,
            "backbone_images": self.images + self.views,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "loader": self.loader,
            "device": self.device,
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "compiled": self.compiled,
            "ranks": self.ranks,
            "out": str(self.out),
        }


def default_cache_path(dataset: Dataset, arch: str) -> Path:
    """data/<dataset>-<arch>.h5 (a folder's, list's or shards' own directory name, else the kind): caches of several
    backbones side by side."""
    name = dataset.root.resolve().name if dataset.kind in ("folder", "list", "webdataset") else dataset.kind
    return Path("data") / f"{name}-{arch.replace(':', '-')}.h5"


def warn_empty_classes(dataset: Dataset) -> None:
    """A class missing from a split is worth a word, not a refusal: the cache may serve other uses,
    and train-head refuses it when it matters."""
    for split in dataset.splits:
        missing = dataset.empty_classes(split)
        if missing:
            print(f"fastfeat cache: warning: the {split} split has no images of class {', '.join(missing)}",
                  file=sys.stderr)


def cache_attrs(dataset: Dataset, spec: FeatureSpec, batch_size: int, limit: int | None = None, seed: int = 0,
                plan: ViewPlan = NO_VIEWS) -> dict:
    """The attributes that make a cache self-describing (and decide whether a partial one can resume)."""
    return {
        **plan.attrs(),
        "fastfeat_version": __version__,
        **spec.to_attrs(),
        "batch_size": batch_size,
        "dataset": dataset.kind,
        "dataset_path": str(dataset.root.resolve()),
        "dataset_source": dataset.source,  # what was read beside the root (list files, shards); "" for the root alone
        "dataset_sha256": rows_sha256(dataset),  # every split's labels and files, in order: --resume sees a change
        "classes": json.dumps(list(dataset.classes)),
        "limit": limit or 0,  # 0: every row; else a class-balanced subset drawn with `seed`
        "seed": seed,
    }


def build_cache(opts: CacheOptions, backbone: Backbone | None = None, extractor: FeatureExtractor | None = None) -> CacheResult:
    """Run the backbone once over every selected split and write the cache; resumable.

    Under torchrun each rank caches a contiguous slice of every split into its own shard file;
    rank 0 then joins the shards, in rank order, into the one cache file. `backbone` and `extractor`:
    built (and warmed) ones to reuse, as `fastfeat bench` does to keep startup out of its timing.
    """
    if opts.batch_size is not None and opts.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {opts.batch_size}")
    world, device = init_world(opts.device)
    dataset = open_dataset(opts.data, opts.dataset, opts.splits, opts.limit, opts.download, opts.seed,
                           opts.source_inputs())
    if world.is_main:
        warn_empty_classes(dataset)
    out = Path(opts.out) if opts.out else default_cache_path(dataset, opts.arch)
    check_output(out, "--out")
    with _final_lock(out, world):
        return _build_cache(opts, out, dataset, world, device, backbone, extractor)


@contextmanager
def _final_lock(out: Path, world: World) -> Iterator[None]:
    """Rank 0 holds the final file's lock (ranks write their own shards); when it cannot take it, every rank
    stops at once, before any writes a shard."""
    lock, refusal = OutputLock(out), None
    if world.is_main:
        try:
            lock.__enter__()
        except InputError as exc:
            refusal = exc
    if int(all_reduce_sum(torch.tensor([int(refusal is not None)]), world).item()):
        raise refusal or InputError(f"{out} is being written by another fastfeat run (see rank 0's error)")
    try:
        yield
    finally:
        if world.is_main:
            lock.__exit__()


def _build_cache(opts: CacheOptions, out: Path, dataset: Dataset, world: World, device: torch.device,
                 backbone: Backbone | None, extractor: FeatureExtractor | None) -> CacheResult:
    if out.exists() and not opts.overwrite:
        raise InputError(f"{out} already exists (pass --overwrite to replace it)")
    plan = opts.view_plan()
    loader = resolve_loader(opts.loader)
    chosen = choose_precision(device, opts.amp, opts.amp_dtype)
    backbone = backbone or opts.build()
    spec, pre = backbone.spec.with_precision(chosen.name), backbone.spec.pre
    rows = {name: len(split) for name, split in dataset.splits.items()}
    compile = compile_wanted(opts.compile, sum(rows.values()), device, "forward", chosen.dtype)
    extractor = extractor or FeatureExtractor(backbone.model, device, chosen.dtype, opts.channels_last, compile)
    attrs = {**cache_attrs(dataset, spec, opts.batch(device), opts.limit, opts.seed, plan),
             "precision_reason": chosen.reason}
    shards = {name: shard_range(n, world) for name, n in rows.items()}
    target = shard_path(out, world.rank, world.size) if world.distributed else out
    start_time, images, views, failure = time.perf_counter(), 0, 0, None
    try:
        shard_rows = {n: stop - start for n, (start, stop) in shards.items()}
        shard_files = source_files(dataset, shards)
        if not (world.distributed and opts.resume and finished_shard(target, attrs, shard_rows, opts.dtype, shard_files)):
            images, views = _cache_rows(target, attrs, shards, shard_files, dataset, extractor, loader, pre, opts, world)
    except (Exception, KeyboardInterrupt) as exc:
        failure = exc
    failed_ranks = int(all_reduce_sum(torch.tensor([int(failure is not None)]), world).item())
    if failure is not None:
        raise failure
    if failed_ranks:
        raise FastfeatError(f"{failed_ranks} other rank(s) failed; fix the cause and rerun with --resume to continue")
    images, views = all_reduce_sum(torch.tensor([images, views]), world).tolist()
    if world.distributed and world.is_main:
        files = source_files(dataset, {name: (0, n) for name, n in rows.items()})
        _join_shards(out, [shard_path(out, r, world.size) for r in range(world.size)], attrs, rows, files, opts)
    barrier(world)
    seconds = time.perf_counter() - start_time
    size = out.stat().st_size if out.exists() else 0
    return CacheResult(out, images, seconds, loader, str(device), chosen.name, size, rows, world.size, views,
                       chosen.reason, extractor.forward.compiled)


def source_files(dataset: Dataset, row_ranges: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """The image paths, relative to the dataset root, of each split's rows [start, stop); none for arrays."""
    files = {}
    for name, split in dataset.splits.items():
        if split.files is not None:
            start, stop = row_ranges[name]
            files[name] = [str(Path(f).relative_to(dataset.root)) for f in split.files[start:stop]]
    return files


def _cache_rows(target: Path, attrs: dict, shards: dict[str, tuple[int, int]], files: dict[str, list[str]],
                dataset: Dataset, extractor: FeatureExtractor, loader: str, pre: Preprocess, opts: CacheOptions,
                world: World) -> tuple[int, int]:
    """Write this rank's rows of every split into `target` (the cache, or this rank's shard); returns
    the images and the extra views added."""
    plan = opts.view_plan()
    writer = CacheWriter(
        target, attrs, {n: stop - start for n, (start, stop) in shards.items()}, attrs["feature_dim"],
        opts.dtype, opts.resume, opts.overwrite or world.distributed, files, plan.by_split(dataset.splits),
    )
    try:
        added = {name: _cache_split(writer, name, split.rows(*shards[name]), extractor, loader, pre, opts, world,
                                    shards[name][0])
                 for name, split in dataset.splits.items()}
        writer.finish()
    finally:
        writer.close()
    return sum(added.values()), sum(n * len(plan.transforms(name)) for name, n in added.items())


def _cache_split(writer: CacheWriter, name: str, split: Split, extractor: FeatureExtractor, loader: str,
                 pre: Preprocess, opts: CacheOptions, world: World, first_row: int = 0) -> int:
    """Features (and extra views) of the rows of `split` that `writer` does not have yet; returns how many
    rows were added. `first_row`: where `split` starts in the whole split (this rank's shard)."""
    done = row = writer.rows_written(name)
    desc = f"cache {name}" + (f" (rank 0 of {world.size})" if world.distributed else "")
    plan = opts.view_plan()
    with progress(len(split), desc, opts.progress and world.is_main, initial=done) as bar:
        batch_size = opts.batch(extractor.device)
        batches = _batches(split.rows(done, len(split)), loader, pre, batch_size, extractor.device, plan)
        for features in host_arrays(_features(extractor, batches, plan, name, first_row + done, pre), extractor.device):
            views = features[:, 1:] if features.shape[1] > 1 else None
            writer.write(name, row, features[:, 0], split.labels[row : row + len(features)], views)
            row += len(features)
            bar.update(len(features))
    return row - done


def _batches(split: Split, loader: str, pre: Preprocess, batch_size: int, device: torch.device, plan: ViewPlan):
    """(center crops, decoded images or None) per batch: decoded images only when views need them."""
    if plan.needs_decoded():
        return center_and_decoded_batches(split, loader, pre, batch_size, device)
    return ((images, None) for images in eval_batches(split, loader, pre, batch_size, device))


def _features(extractor: FeatureExtractor, batches, plan: ViewPlan, name: str, first_row: int,
              pre: Preprocess) -> Iterator[torch.Tensor]:
    """(n, 1 + V, D) features per batch, still on the device: the center crops', then each extra view's
    (`first_row`: the batches' first row in the whole split, which seeds the views)."""
    row = first_row
    for images, decoded in batches:
        views = plan.images(name, row, images, decoded, pre)
        yield torch.stack([extractor(images), *(extractor(view) for view in views)], 1)
        row += len(images)


def _join_shards(out: Path, shards: list[Path], attrs: dict, rows: dict[str, int], files: dict[str, list[str]],
                 opts: CacheOptions) -> None:
    writer = CacheWriter(out, attrs, rows, attrs["feature_dim"], opts.dtype, overwrite=True, split_files=files,
                         split_views=opts.view_plan().by_split(rows))
    try:
        writer.append_shards(shards)
        writer.finish()
    finally:
        writer.close()
    for shard in shards:
        shard.unlink()
