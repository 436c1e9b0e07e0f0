"""Cached views on a transfer task: the probe with and without test-time flips and augmented train views.

The task (`transfer_task.build_transfer_task`): a resnet18 pretrained on five CIFAR-10 classes, probed on
the other five (2,500 train and 500 test images of the 32 px sample, `--resize 32 --image-size 32`).
One cache holds everything: `fastfeat cache --tta flip --views N`; a second, plain cache of the same
images measures what the views cost (each view is one more backbone pass over train, the flip one more
over every split). Its center features equal the plain cache's, so every row below reads one cache:

- `single view`: `--views-policy center-only --no-tta` (what a plain cache gives);
- `tta flip`: center-only training, evaluation on the mean of the center and flipped probabilities;
- `views N + flip`: each epoch one view per train row (center, flip or an augmented view), TTA;
- `views N, no tta`: the same training, evaluated on the center crop alone.

Each row trains with train-head's defaults (and `--sweep` with `--sweep`), for `--seeds` head seeds (the
validation holdout and the shuffles), rows interleaved within a seed. 500 test images: about +-2 points
of noise per run, so the mean over seeds is reported with its spread. Head seconds: the fastest of the
seeds (the machine is shared). On 2,250 fit rows a head takes well under a second, mostly noise on a
shared machine, so the time of the views is also measured at scale: `--timing-rows` (50,000) synthetic
512-d rows with N + 1 extra views, the default head's 20 epochs with and without view sampling,
interleaved, the fastest of `--repeats`. Targets: `tta flip` >= +1.5 points over `single view`, and the
views head within (1 + N) x the single-view head's time.

    python benchmarks/bench_views.py [--data ../shared/data/cifar10-sample] [--views 4] [--seeds 3] [--sweep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transfer_task import build_transfer_task

from fastfeat.cache import CacheOptions, build_cache
from fastfeat.head import HeadOptions, train_head
from fastfeat.linear import fit_head
from fastfeat.reporting import write_json
from fastfeat.views import ViewSampler

ROOT = Path(__file__).resolve().parents[1]
TARGET_TTA_POINTS = 1.5
ROWS = {  # name: train-head options
    "single view": dict(views_policy="center-only", tta=False),
    "tta flip": dict(views_policy="center-only", tta=True),
    "views + flip": dict(views_policy="sample", tta=True),
    "views, no tta": dict(views_policy="sample", tta=False),
}


def cache_task(data: Path, weights: Path, out: Path, **views) -> dict:
    """Cache the task's images through the pretrained backbone; the cache's metrics."""
    result = build_cache(CacheOptions(data=str(data), out=str(out), weights=str(weights), resize=32, image_size=32,
                                      device="cpu", progress=False, overwrite=True, **views))
    return result.metrics()


def probe_rows(cache: Path, seeds: int, sweep: bool, work: Path) -> dict:
    """Test accuracy and head seconds of every row for every seed."""
    runs = {name: [] for name in ROWS}
    for seed in range(seeds):
        for name, kw in ROWS.items():
            opts = HeadOptions(cache=str(cache), out=str(work / "head.pt"), device="cpu", seed=seed, sweep=sweep, **kw)
            result = train_head(opts, log=lambda line: None)
            runs[name].append({"seed": seed, "test_acc": result.test["top1"], "seconds": result.seconds,
                               "views": result.views})
    return {name: summary(r) for name, r in runs.items()}


def summary(runs: list[dict]) -> dict:
    accs = [r["test_acc"] for r in runs]
    return {"test_acc_mean": statistics.mean(accs), "test_acc_spread": statistics.pstdev(accs),
            "seconds_best": min(r["seconds"] for r in runs), "rows_read": runs[0]["views"].get("rows_read"),
            "runs": runs}


def timing_at_scale(rows: int, views: int, repeats: int) -> dict:
    """Seconds of the default head (20 sgd epochs) on `rows` synthetic rows, center only and sampling
    among the center and `views` + 1 float16 extra views (flip + views), interleaved; the fastest of `repeats`."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (rows,), generator=g)
    center = (torch.randn(rows, 512, generator=g) + 2 * torch.nn.functional.one_hot(y, 512)).half().float()
    extra = (center[:, None] + 0.3 * torch.randn(rows, views + 1, 512, generator=g)).half()
    names = ["flip"] + ["recipe"] * views
    seconds = {"single view": [], "views + flip": []}
    for _ in range(repeats):
        for name, sampler in (("single view", lambda: None), ("views + flip", lambda: ViewSampler(center, extra, names, 0))):
            start = time.perf_counter()
            fit_head(center, y, center[:1000], y[:1000], 10, HeadOptions(device="cpu"), lambda line: None, sampler())
            seconds[name].append(time.perf_counter() - start)
    best = {name: min(s) for name, s in seconds.items()}
    return {"rows": rows, "extra_views": views + 1, "seconds_best": best, "seconds": seconds,
            "ratio": best["views + flip"] / best["single view"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-sample")
    parser.add_argument("--task-dir", type=Path, default=Path(tempfile.gettempdir()) / "fastfeat-transfer")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="also the rows with train-head --sweep")
    parser.add_argument("--timing-rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench_views.json"))
    args = parser.parse_args()

    task = build_transfer_task(args.data, args.task_dir)
    caches = {"plain": args.task_dir / "plain.h5", "views": args.task_dir / f"views{args.views}-flip.h5"}
    cost = {"plain": cache_task(task.target_data, task.weights, caches["plain"]),
            "views": cache_task(task.target_data, task.weights, caches["views"], tta="flip", views=args.views)}
    report = {"task": {"source_test_accuracy": task.source_test_accuracy, "classes": list(task.classes)},
              "views": args.views, "seeds": args.seeds, "cache": cost,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
              "heads": {"default": probe_rows(caches["views"], args.seeds, False, args.task_dir)}}
    if args.sweep:
        report["heads"]["sweep"] = probe_rows(caches["views"], args.seeds, True, args.task_dir)
    report["timing"] = timing_at_scale(args.timing_rows, args.views, args.repeats)
    for kind, rows in report["heads"].items():
        single = rows["single view"]
        print(f"train-head ({kind}), {args.seeds} seeds, {args.views} views + flip:")
        for name, row in rows.items():
            print(f"  {name:<15} test acc {100 * row['test_acc_mean']:.1f} +- {100 * row['test_acc_spread']:.1f} "
                  f"({100 * (row['test_acc_mean'] - single['test_acc_mean']):+.1f}), head {row['seconds_best']:.2f} s "
                  f"({row['seconds_best'] / single['seconds_best']:.1f}x)")
        gain = 100 * (rows["tta flip"]["test_acc_mean"] - single["test_acc_mean"])
        ratio = rows["views + flip"]["seconds_best"] / single["seconds_best"]
        rows["targets"] = {"tta_points": gain, "tta_target_met": gain >= TARGET_TTA_POINTS,
                           "views_time_ratio": ratio, "views_time_target_met": ratio <= 1 + args.views}
        print(f"  targets: tta {gain:+.1f} points (>= {TARGET_TTA_POINTS}), views head {ratio:.1f}x (<= {1 + args.views})")
    timing = report["timing"]
    print(f"at scale ({timing['rows']} rows, {timing['extra_views']} extra views): head "
          + ", ".join(f"{name} {s:.2f} s" for name, s in timing["seconds_best"].items())
          + f": {timing['ratio']:.2f}x (<= {1 + args.views})")
    for name, metrics in cost.items():
        print(f"cache {name}: {metrics['images']} images + {metrics['views']} views in {metrics['seconds']:.1f} s")
    write_json(args.json, report)
    print(json.dumps(report["machine"]))


if __name__ == "__main__":
    main()
