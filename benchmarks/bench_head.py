"""Head training from a feature cache: seconds and accuracy, against a tuned probe and the recipe.

Trains the 512->K head with `train_head` and its defaults (20 epochs) on a cache of 50,000 train
and 10,000 test rows, `--repeats` times (loading is not timed; the machine is shared and noisy, so
the median and the fastest run are reported), and puts it beside:

- **the tuned L-BFGS reference** (`fit_lbfgs_reference`): standardised L2 logistic regression, the
  L2 strength picked on a held-out 20 % of train from a half-decade grid, refit on all of train;
  the target is a test accuracy within 0.5 points of it;
- **the original recipe's cost** for the same 20 epochs: 20 backbone passes over the train and test
  images at `--backbone-images-per-second` (default: measured here, fp32 resnet18 at 224 px on
  batches of 32 random images under inference mode; the recipe's own loop, with decoding,
  augmentation and a DataLoader, is slower still).

The features come from `--cache FILE` (a real `fastfeat cache` file), or are generated: a synthetic
but realistic problem whose linear-probe test accuracy is about 87 % (see `synthetic_split`), written as a float16
cache like `fastfeat cache` writes.

    python benchmarks/bench_head.py [--cache FILE] [--repeats 3] [--backbone-images-per-second N] [--sweep] [--sklearn]

With `--sklearn` it also fits scikit-learn's `LogisticRegression` with C chosen on the validation split that
train-head holds out (the issue's accepted reference; target: the sweep's chosen head within 0.3 points).
With `--sweep` it also times `train-head --sweep` (the default 8 lrs x 6 weight decays, trained at once,
the best refit on all of train) against one default head (target: at most 10x its time), and reports the
chosen head's test accuracy beside the tuned reference.

It prints the numbers and writes them, with the parameters and machine info, to `--json`.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from probe_reference import fit_lbfgs_reference, fit_sklearn_reference

from fastfeat.cache import cache_attrs
from fastfeat.cache_file import CacheWriter
from fastfeat.errors import FastfeatError
from fastfeat.head import HeadOptions, load_features, train_head
from fastfeat.reporting import write_json
from fastfeat.sources import Dataset
from fastfeat.spec import FeatureSpec
from fastfeat.transforms import Preprocess

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS, TARGET_POINTS = 2.0, 0.5
TARGET_SWEEP_RATIO, TARGET_SKLEARN_POINTS = 10.0, 0.3


def synthetic_split(rng: np.random.Generator, centres: np.ndarray, mix: np.ndarray, scale: np.ndarray,
                    n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of class clusters in a 512-d latent space (unit Gaussians around overlapping centres),
    mixed by a fixed random matrix, passed through softplus, scaled per feature and by a per-row gain:
    non-negative, correlated (one dominant direction), unevenly scaled features like pooled ReLU
    activations, with a few points between train and test accuracy; float16 like a cache."""
    labels = rng.integers(0, len(centres), n)
    latent = centres[labels] + rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    mixed = latent @ mix + 0.05 * rng.standard_normal((n, mix.shape[1]), dtype=np.float32)
    gain = np.exp(0.3 * rng.standard_normal((n, 1), dtype=np.float32))
    return (np.logaddexp(0, mixed) * scale * gain).astype(np.float16), labels


def write_synthetic_cache(out: Path, n_train: int, n_test: int, classes: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    centres = (0.15 * rng.standard_normal((classes, 512))).astype(np.float32)
    mix = (rng.standard_normal((512, 512)) / math.sqrt(512)).astype(np.float32)
    scale = np.exp(0.5 * rng.standard_normal(512)).astype(np.float32)
    names = tuple(f"class{i}" for i in range(classes))
    spec = FeatureSpec("resnet18", "synthetic", "0" * 64, 512, Preprocess())
    attrs = cache_attrs(Dataset("folder", out.parent, names, {}), spec, batch_size=0)
    writer = CacheWriter(out, attrs, {"train": n_train, "test": n_test}, 512)
    for split, n in (("train", n_train), ("test", n_test)):
        writer.write(split, 0, *synthetic_split(rng, centres, mix, scale, n))
    writer.finish()
    writer.close()
    return out


def backbone_images_per_second(seconds: float = 4.0, batch_size: int = 32) -> float:
    """fp32 resnet18 forward passes at 224 px on random images, for about `seconds`."""
    model = torchvision.models.resnet18().eval()
    images = torch.randn(batch_size, 3, 224, 224)
    with torch.inference_mode():
        model(images)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model(images)
            done += batch_size
    return done / (time.perf_counter() - start)


def measure_head(cache: Path, out: Path, repeats: int) -> tuple[list[float], dict]:
    """Seconds of `repeats` default trainings, and the last run's metrics."""
    seconds = []
    for _ in range(repeats):
        result = train_head(HeadOptions(cache=str(cache), out=str(out), device="cpu"), log=lambda line: None)
        seconds.append(result.seconds)
    return seconds, result.metrics()


def measure_sweep(cache: Path, out: Path, repeats: int) -> tuple[list[float], dict]:
    """Seconds of `repeats` default sweeps (grid, choice and refit; loading not timed), and the last run's metrics."""
    seconds = []
    for _ in range(repeats):
        result = train_head(HeadOptions(cache=str(cache), out=str(out), device="cpu", sweep=True), log=lambda line: None)
        seconds.append(result.seconds)
    return seconds, result.metrics()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="a fastfeat cache (default: a synthetic one)")
    parser.add_argument("--train", type=int, default=50_000, help="synthetic train rows")
    parser.add_argument("--test", type=int, default=10_000, help="synthetic test rows")
    parser.add_argument("--repeats", type=int, default=3, help="timed trainings")
    parser.add_argument("--backbone-images-per-second", type=float, default=None,
                        help="the recipe's backbone speed (default: measure fp32 resnet18 at 224 px here)")
    parser.add_argument("--sweep", action="store_true", help="also time train-head --sweep against one head")
    parser.add_argument("--sklearn", action="store_true",
                        help="also fit scikit-learn's LogisticRegression, C chosen on train-head's validation split "
                             "(the issue's accepted reference; a few minutes at 50k rows; pip install scikit-learn)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "bench_head.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or write_synthetic_cache(Path(tmp) / "synthetic.h5", args.train, args.test)
        seconds, metrics = measure_head(cache, Path(tmp) / "head.pt", args.repeats)
        sweep = measure_sweep(cache, Path(tmp) / "sweep.pt", args.repeats) if args.sweep else None
        _, classes, tensors = load_features(cache, torch.device("cpu"))
        train_y, test_y = tensors[1], tensors[3]
        start = time.perf_counter()
        reference, l2 = fit_lbfgs_reference(*tensors, len(classes))
        reference_seconds = time.perf_counter() - start
        start = time.perf_counter()
        sklearn = fit_sklearn_reference(*tensors) if args.sklearn else None
        sklearn_seconds = time.perf_counter() - start
    measured = args.backbone_images_per_second is None
    ips = backbone_images_per_second() if measured else args.backbone_images_per_second
    epochs = len(metrics["epochs"])
    recipe_seconds = epochs * (len(train_y) + len(test_y)) / ips
    accuracy, median = metrics["test"]["top1"], statistics.median(seconds)
    points = 100 * (accuracy - reference)

    print(f"features: {args.cache or 'synthetic'} ({len(train_y)} train, {len(test_y)} test rows, "
          f"{torch.get_num_threads()} torch threads)")
    print(f"train-head, {epochs} epochs:   {median:.2f} s median, {min(seconds):.2f} s fastest of {len(seconds)} "
          f"({', '.join(f'{s:.2f}' for s in seconds)}), test acc {100 * accuracy:.2f} %")
    print(f"tuned L-BFGS reference:  test acc {100 * reference:.2f} % (L2 {l2:g}, {reference_seconds:.1f} s); "
          f"difference {points:+.2f} points (target within {TARGET_POINTS})")
    print(f"original recipe, {epochs} epochs: {recipe_seconds:.0f} s of backbone passes over "
          f"{len(train_y) + len(test_y)} images at {ips:.1f} img/s ({'measured' if measured else 'given'}); "
          f"train-head is {recipe_seconds / median:.0f}x faster")
    print(f"targets: <= {TARGET_SECONDS} s ({'met' if median <= TARGET_SECONDS else 'MISSED'} by the median), "
          f"within {TARGET_POINTS} points ({'met' if abs(points) <= TARGET_POINTS else 'MISSED'})")
    sklearn_report = None
    if sklearn is not None:
        chosen = sweep[1]["test"]["top1"] if sweep is not None else accuracy
        sklearn_points = 100 * (chosen - sklearn[0])
        met = abs(sklearn_points) <= TARGET_SKLEARN_POINTS
        print(f"scikit-learn LogisticRegression: test acc {100 * sklearn[0]:.2f} % (C {sklearn[1]:g}, {sklearn_seconds:.0f} s); "
              f"{'the sweep' if sweep is not None else 'one head'} {sklearn_points:+.2f} points "
              f"(target within {TARGET_SKLEARN_POINTS}: {'met' if met else 'MISSED'})")
        sklearn_report = {"test_acc": sklearn[0], "C": sklearn[1], "seconds": round(sklearn_seconds, 1),
                          "compared": "sweep" if sweep is not None else "head", "difference_points": round(sklearn_points, 3),
                          "target_points": TARGET_SKLEARN_POINTS, "met": met}
    sweep_report = None
    if sweep is not None:
        sweep_seconds, sweep_metrics = sweep
        sweep_median = statistics.median(sweep_seconds)
        grid = sweep_metrics["sweep"]
        only = grid["seconds"]
        ratio = sweep_median / median
        sweep_acc = sweep_metrics["test"]["top1"]
        print(f"train-head --sweep, {len(grid['lrs'])}x{len(grid['weight_decays'])} heads: {sweep_median:.2f} s median "
              f"({', '.join(f'{s:.2f}' for s in sweep_seconds)}; the batched grid alone {only:.2f} s of the last run), "
              f"{ratio:.1f}x one head (target <= {TARGET_SWEEP_RATIO:g}x: {'met' if ratio <= TARGET_SWEEP_RATIO else 'MISSED'}); "
              f"best lr {grid['best']['lr']:g}, weight decay {grid['best']['weight_decay']:.3g}, valid acc "
              f"{100 * grid['best']['val_acc']:.2f} %, refit test acc {100 * sweep_acc:.2f} % "
              f"({100 * (sweep_acc - reference):+.2f} points vs the reference)")
        sweep_report = {"seconds": [round(s, 3) for s in sweep_seconds], "seconds_median": round(sweep_median, 3),
                        "grid_seconds": grid["seconds"], "ratio_to_one_head": round(ratio, 2),
                        "target_ratio": TARGET_SWEEP_RATIO, "ratio_met": ratio <= TARGET_SWEEP_RATIO,
                        "test_acc": sweep_acc, "difference_points": round(100 * (sweep_acc - reference), 3), "grid": grid}
    write_json(args.json, {
        "sweep": sweep_report,
        "sklearn": sklearn_report,
        "features": str(args.cache) if args.cache else "synthetic",
        "train_rows": len(train_y), "test_rows": len(test_y),
        "head": {"seconds": [round(s, 3) for s in seconds], "seconds_median": round(median, 3),
                 "test_acc": accuracy, "final_valid_acc": metrics["final_valid_acc"], "validation": metrics["validation"],
                 "options": {k: v for k, v in metrics["options"].items() if k not in ("cache", "out")}},
        "reference": {"test_acc": reference, "l2": l2, "seconds": round(reference_seconds, 3)},
        "difference_points": round(points, 3),
        "recipe": {"backbone_images_per_second": round(ips, 2), "measured": measured, "epochs": epochs,
                   "seconds": round(recipe_seconds, 1), "speedup": round(recipe_seconds / median, 1)},
        "targets": {"seconds": TARGET_SECONDS, "points": TARGET_POINTS,
                    "seconds_met": median <= TARGET_SECONDS, "points_met": abs(points) <= TARGET_POINTS},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "platform": platform.platform()},
    })
    print(f"wrote {args.json}")


if __name__ == "__main__":
    try:
        main()
    except FastfeatError as exc:
        sys.exit(f"bench_head: error: {exc}")
