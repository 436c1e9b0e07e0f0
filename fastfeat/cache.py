"""`fastfeat cache`: one pass of the frozen backbone over a dataset into an HDF5 feature cache."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .backbone import BACKBONE, FEATURE_DIM, FeatureExtractor, build_resnet18
from .cache_file import CacheWriter
from .errors import InputError
from .loaders import eval_batches, resolve_loader
from .runtime import amp_dtype, precision_name, resolve_device
from .sources import Dataset, open_dataset
from .transforms import Preprocess


@dataclass
class CacheOptions:
    data: str = "data"
    out: str | None = None
    dataset: str = "auto"
    splits: tuple[str, ...] = ("train", "test")
    limit: int | None = None
    download: bool = False
    loader: str = "auto"
    resize: int = 256
    image_size: int = 224
    weights: str = "imagenet"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    amp_dtype: str | None = None
    channels_last: bool = True
    compile: bool = False
    batch_size: int = 128
    dtype: str = "float16"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


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

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict:
        return {
            "command": "cache",
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "loader": self.loader,
            "device": self.device,
            "precision": self.precision,
            "out": str(self.out),
        }


def default_cache_path(dataset: Dataset) -> Path:
    name = "cifar10" if dataset.kind == "cifar10" else dataset.root.resolve().name
    return Path("data") / f"{name}-{BACKBONE}.h5"


def cache_attrs(dataset: Dataset, pre: Preprocess, weights_id: str, sha256: str, precision: str, batch_size: int) -> dict:
    """The attributes that make a cache self-describing (and decide whether a partial one can resume)."""
    return {
        "fastfeat_version": __version__,
        "backbone": BACKBONE,
        "feature_dim": FEATURE_DIM,
        "weights": weights_id,
        "weights_sha256": sha256,
        "image_size": pre.image_size,
        "resize": pre.resize,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "amp_dtype": precision,
        "batch_size": batch_size,
        "dataset": dataset.kind,
        "dataset_path": str(dataset.root.resolve()),
        "classes": json.dumps(list(dataset.classes)),
    }


def build_cache(opts: CacheOptions) -> CacheResult:
    """Run the backbone once over every selected split and write the cache; resumable."""
    if opts.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {opts.batch_size}")
    dataset = open_dataset(opts.data, opts.dataset, tuple(opts.splits), opts.limit, opts.download)
    loader = resolve_loader(opts.loader)
    device = resolve_device(opts.device)
    dtype = amp_dtype(device, opts.amp, opts.amp_dtype)
    pre = Preprocess(resize=opts.resize, image_size=opts.image_size)
    model, info = build_resnet18(opts.weights, opts.seed)
    extractor = FeatureExtractor(model, device, dtype, opts.channels_last, opts.compile)
    out = Path(opts.out) if opts.out else default_cache_path(dataset)
    attrs = cache_attrs(dataset, pre, info.weights_id, info.sha256, precision_name(dtype), opts.batch_size)
    rows = {name: len(split) for name, split in dataset.splits.items()}
    writer = CacheWriter(out, attrs, rows, FEATURE_DIM, opts.dtype, opts.resume, opts.overwrite)
    start_time, images = time.perf_counter(), 0
    try:
        for name, split in dataset.splits.items():
            done = writer.rows_written(name)
            todo = split.rows(done, len(split))
            bar = tqdm(total=len(split), initial=done, desc=f"cache {name}", unit="img", disable=not opts.progress, dynamic_ncols=True)
            row = done
            for images_batch in eval_batches(todo, loader, pre, opts.batch_size, device):
                features = extractor(images_batch).cpu().numpy()
                writer.write(name, row, features, split.labels[row : row + len(features)])
                row += len(features)
                images += len(features)
                bar.update(len(features))
            bar.close()
        seconds = time.perf_counter() - start_time
        out = writer.finish()
    finally:
        writer.close()
    return CacheResult(out, images, seconds, loader, str(device), precision_name(dtype), out.stat().st_size, rows)
