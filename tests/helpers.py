"""What the tests share (fixtures live in conftest.py): constants, tiny data makers, the CLI run
in-process, in a process of its own or under torchrun, and the independent references more than
one test module compares with. Test modules import from here, never from each other."""
from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from fastfeat.cache import cache_attrs
from fastfeat.cache_file import CacheWriter
from fastfeat.cli import main
from fastfeat.loaders import dali_available
from fastfeat.runtime import precision
from fastfeat.sources import Dataset, open_dataset
from fastfeat.spec import FeatureSpec
from fastfeat.transforms import Preprocess

REPO = Path(__file__).resolve().parents[1]
# what `--amp` (the default) runs in on this machine's CPU: the precision policy's choice, native here
CPU_AMP = precision(torch.device("cpu"), True)
REAL_SAMPLE = REPO.parent / "shared" / "data" / "cifar10-sample"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The generated sample: 1,000 train and 500 test images (every fourth file a PNG), small enough to
# run every test on all of it in seconds on 2 cores.
SAMPLE_TRAIN_PER_CLASS, SAMPLE_TEST_PER_CLASS = 100, 50
CLASSES = ("a", "b", "c")
NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
LOADERS = ["torch", pytest.param("dali", marks=NEEDS_DALI)]
# a tiny CPU run's input flags (32-px crops of 36-px resizes, the torch loader), and with torchvision's random init
CPU_32 = ["--image-size", "32", "--resize", "36", "--device", "cpu", "--loader", "torch"]
TINY = [*CPU_32, "--weights", "none"]


def cpu_flag_precisions() -> set[str]:
    """The precisions this CPU runs natively, from the kernel's CPU flags (independent of torch's and
    oneDNN's checks); off Linux/x86, only float32 is known to be native."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    native = {"float32"}
    if flags & {"avx512_bf16", "amx_bf16"}:
        native.add("bfloat16")
    if flags & {"avx512_fp16", "amx_fp16"}:
        native.add("float16")
    return native


# ---- running the command line ------------------------------------------------------------------------


def error_lines(stderr: str | list[str]) -> list[str]:
    """The non-empty stderr lines but the info lines (such as, on a CPU without native bf16, where `--amp`
    runs in float32): what a one-line error is counted on."""
    lines = stderr.splitlines() if isinstance(stderr, str) else stderr
    return [line for line in lines if line.strip() and not line.startswith("fastfeat: info: ")]


def run(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """Run the CLI in-process: exit code, stdout and the non-empty stderr lines."""
    done = fastfeat_here(capsys, *argv)
    return done.returncode, done.stdout, [line for line in done.stderr.splitlines() if line.strip()]


def one_line(argv: list[str], capsys, match: str, code: int = 2) -> str:
    """Run the CLI in-process and check that it failed with `code` and one error line containing `match`."""
    got, _, err = run(argv, capsys)
    err = error_lines(err)
    assert got == code and len(err) == 1, (got, err)
    assert match in err[0] and err[0].startswith(f"fastfeat {argv[0]}: "), err[0]
    return err[0]


def fastfeat_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """`fastfeat(*args)` run in this process (no torch import to pay): for checks of the exit code and of
    what the command itself prints."""
    try:
        code = main(list(map(str, args)))
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["fastfeat", *map(str, args)], code, out, err)


def fastfeat(*args: str) -> subprocess.CompletedProcess:
    """The real command line in a process of its own, so every line it writes to stderr is seen."""
    return subprocess.run([sys.executable, "-m", "fastfeat", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """`python -m fastfeat ARGS` under torchrun on the CPU (gloo), one thread a rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "fastfeat", *args],
        capture_output=True, text=True, timeout=600, env=env,
    )


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding `path`'s output lock until killed."""
    code = f"from fastfeat.outputs import OutputLock\nwith OutputLock({str(path)!r}):\n print('held', flush=True)\n" \
           " import time; time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---- tiny data -----------------------------------------------------------------------------------------


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


def make_cifar(root: Path, n_train: int = 64, n_test: int = 32) -> Path:
    """A learnable two-class CIFAR-10-layout dataset: class 0 dark images, class 1 bright ones."""
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


# ---- crafted pickles -------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it creates `marker` (what an attacker's file would do, less harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def refused(stderr: str, command: str, what: str, path: Path, allowed: str) -> bool:
    """Exactly one error line: the command's line refusing `path`, naming the code it would have run."""
    prefix = f"fastfeat {command}: error: refusing {what} {path}: it holds Python objects other than {allowed} ("
    lines = error_lines(stderr)
    return len(lines) == 1 and lines[0].startswith(prefix) and "exec" in lines[0]


def cache_error(capsys, *argv: str) -> tuple[int, list[str]]:
    """Exit code and the non-empty stderr lines of `fastfeat cache ARGV`."""
    code = main(["cache", "--no-progress", "--device", "cpu", "--weights", "none", "--loader", "torch", *argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def write_list(folder, name: str = "train.csv", labels: str = "names", sep: str = ",", split: str = "train") -> list:
    """A list of every image of folder/<split>/ (in the folder's order), with class names or integers."""
    dataset = open_dataset(folder, "folder", (split,))
    rel = [str(Path(f).relative_to(folder)) for f in dataset.splits[split].files]
    text = ["path" + sep + "label"] + [
        sep.join((path, dataset.classes[y] if labels == "names" else str(y)))
        for path, y in zip(rel, dataset.splits[split].labels.tolist())]
    (folder / name).write_text("\n".join(text) + "\n")
    return rel


def cache_rows(path) -> dict[str, np.ndarray]:
    """Every split's features, labels and files of a complete cache."""
    with h5py.File(path) as f:
        assert f.attrs["complete"]
        return {f"{s}/{k}": f[s][k][:] for s in ("train", "test") for k in ("features", "labels", "files")}


# ---- independent references ------------------------------------------------------------------------------


def assert_same_features(a: torch.Tensor, b: torch.Tensor, centre: torch.Tensor, cos_min: float = 0.999) -> None:
    """Per-image cosine >= cos_min, raw and after removing the common mean (which random-init
    features are dominated by), and each row is closer to its own reference than to any other."""
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert cos.min() >= cos_min, cos.min()
    ca, cb = a - centre, b - centre
    centred = torch.nn.functional.cosine_similarity(ca, cb)
    assert centred.min() >= 0.98, centred.min()
    cross = torch.nn.functional.normalize(ca, dim=1) @ torch.nn.functional.normalize(cb, dim=1).T
    assert (cross.argmax(dim=1) == torch.arange(len(a))).all()


def reference_predictions(train_x: np.ndarray, train_y: np.ndarray, queries: np.ndarray, k: int, temperature: float,
                          num_classes: int) -> np.ndarray:
    """Weighted kNN by brute force in float64: the full cosine similarity matrix, each query's train rows
    sorted by it, and the weighted vote of the first k counted one neighbour at a time."""
    unit = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    sims = unit(queries) @ unit(train_x).T
    preds = []
    for row in sims:
        votes = [0.0] * num_classes
        for j in np.argsort(-row, kind="stable")[:k]:
            votes[train_y[j]] += math.exp(row[j] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)
