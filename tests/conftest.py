"""Shared fixtures: a generated CIFAR-10-like sample (and the real one where present), a resnet18
weights file, small image folders."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fastfeat.cache import cache_attrs
from fastfeat.cache_file import CacheWriter
from fastfeat.cli import main
from fastfeat.runtime import precision
from fastfeat.sources import Dataset
from fastfeat.spec import FeatureSpec
from fastfeat.synthetic import write_sample
from fastfeat.transforms import Preprocess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the probe reference lives there

# what `--amp` (the default) runs in on this machine's CPU: the precision policy's choice, native here
CPU_AMP = precision(torch.device("cpu"), True)
REAL_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-sample"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The generated sample: 1,000 train and 500 test images (every fourth file a PNG), small enough to
# run every test on all of it in seconds on 2 cores.
SAMPLE_TRAIN_PER_CLASS, SAMPLE_TEST_PER_CLASS = 100, 50
CLASSES = ("a", "b", "c")


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """A generated CIFAR-10 sample laid out like the real one: `cifar-10-batches-py/` and `folder/`
    holding the same images (see fastfeat.synthetic), so the suite runs on a fresh clone."""
    return write_sample(tmp_path_factory.mktemp("sample"), SAMPLE_TRAIN_PER_CLASS, SAMPLE_TEST_PER_CLASS,
                        formats=("jpg", "jpg", "jpg", "png"))


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """The real CIFAR-10 sample (5,000 train and 1,000 test images) next to the repository, if there."""
    if not (REAL_SAMPLE / "cifar-10-batches-py").is_dir() or not (REAL_SAMPLE / "folder").is_dir():
        pytest.skip(f"the real CIFAR-10 sample is not at {REAL_SAMPLE} (only the generated one is used)")
    return REAL_SAMPLE


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A resnet18 state dict (random init, fixed seed, with fc) as a user would pass with --weights."""
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def make_folder(root: Path, sizes=((40, 50), (37, 29)), per_class: int = 3, classes=("cat", "dog"),
                splits=("train", "test")) -> Path:
    """root/<split>/<class>/<i>.{jpg,png}: small random RGB images of mixed sizes and formats."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "folder")


def make_cifar(root: Path, n_train: int = 64, n_test: int = 32) -> Path:
    """A learnable two-class CIFAR-10-layout dataset: class 0 dark images, class 1 bright ones."""
    import pickle

    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        labels = rng.integers(0, 2, n)
        level = np.where(labels == 1, 190, 60)[:, None]
        data = np.clip(level + rng.normal(0, 25, (n, 3 * 32 * 32)), 0, 255).astype(np.uint8)
        return {b"data": data, b"labels": labels.tolist(), b"filenames": [f"{i}.png".encode() for i in range(n)]}

    for i in range(1, 6):
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train // 5)))
    (base / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"dark", b"bright"]}))
    return root


@pytest.fixture(scope="session")
def learnable(tmp_path_factory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("learnable"), n_train=160, n_test=40)


def write_cache(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes=CLASSES, finish: bool = True,
                files: dict[str, list[str]] | None = None, views: dict[str, tuple[list[str], np.ndarray]] | None = None,
                **attrs) -> Path:
    """A cache file as `fastfeat cache` writes it, from given features and labels (and image paths, and per
    split the names and (N, V, D) features of extra views)."""
    dataset = Dataset("folder", out.parent, tuple(classes), {})
    dim = next(iter(splits.values()))[0].shape[1]
    base = cache_attrs(dataset, FeatureSpec("resnet18", "none:seed=0", "0" * 64, dim, Preprocess(), "bfloat16"), 128)
    views = views or {}
    split_views = {s: [{"transform": name, "seed": 0} for name in names] for s, (names, _) in views.items()}
    writer = CacheWriter(out, {**base, **attrs}, {s: len(y) for s, (_, y) in splits.items()}, dim, split_files=files,
                         split_views=split_views)
    for split, (x, y) in splits.items():
        writer.write(split, 0, x, y, views[split][1] if split in views else None)
    if finish:
        writer.finish()
    writer.close()
    return out


def interrupt_cache(monkeypatch, build: Callable[[], object], stop: Callable[[str, int], bool]) -> None:
    """Run `build` (a cache run) with Ctrl-C arriving at the first batch write for which `stop(split, start)`."""
    real_write = CacheWriter.write

    def interrupted_write(self, split, start, *args):
        if stop(split, start):
            raise KeyboardInterrupt
        real_write(self, split, start, *args)

    monkeypatch.setattr(CacheWriter, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        build()
    monkeypatch.setattr(CacheWriter, "write", real_write)


def separable(n: int, rng: np.random.Generator, k: int = len(CLASSES)) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative 512-d features whose class shows in 8 dimensions, on top of strong noise in all."""
    y = rng.integers(0, k, n)
    x = np.abs(rng.normal(1.0, 1.0, (n, 512)))
    for c in range(k):
        x[y == c, 8 * c : 8 * c + 8] += 4.0
    return x.astype(np.float16), y


def run(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """Run the CLI in-process: exit code, stdout and the non-empty stderr lines."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]
