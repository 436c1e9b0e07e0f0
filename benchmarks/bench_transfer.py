"""Transfer accuracy: linear probe, kNN, `fastfeat finetune` per augmentation preset and the plain script.

The task (benchmarks/transfer_task.py): a resnet18 pretrained here on five CIFAR-10 classes at 32 px;
the other five classes are the target. Every run sees the target's train split and reports its test
accuracy (evaluated once) and training images/s:

- `probe`: `fastfeat cache --weights FILE --resize 32 --image-size 32` of the target, then `train-head`
  (its defaults); `knn`: `fastfeat knn` on the same cache;
- `finetune PRESET`: `fastfeat finetune --augment PRESET --init-head` the probe's head, every other
  option its default (test = the last model);
- `plain`: the plain reference script of the issue (`transfer_task.plain_train`) from the same weights.

RUNS is the table of runs: a row is a name and a function of (context, epochs, seed); rows that do not
depend on the epochs (`epochs=False`) run once per seed. Accuracies are reported per seed and as mean
and spread (max - min) over the seeds.

    python benchmarks/bench_transfer.py --data ../shared/data/cifar10-sample [--epochs 4,10] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision

from fastfeat.cli import main as fastfeat
from fastfeat.finetune import FinetuneOptions, finetune
from fastfeat.reporting import write_json
from fastfeat.sources import open_dataset
from fastfeat.synthetic import data_or_sample
from fastfeat.settings import AUGMENT_PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_task import (
    PlainSettings,
    TransferTask,
    accuracy,
    build_transfer_task,
    plain_train,
    tensors,
)

SMALL = ["--resize", "32", "--image-size", "32"]  # the task's own size: no resampling before the model


@dataclass
class Context:
    """What the runs share: the task, the output folder, options for every fastfeat run."""

    task: TransferTask
    out: Path
    finetune_options: dict = field(default_factory=dict)

    def cache(self) -> Path:
        """The probe's cache of the target data (features do not depend on the seed: made once)."""
        path = self.out / "target-cache.h5"
        if not path.exists() or path.stat().st_mtime < self.task.weights.stat().st_mtime:  # made for another task
            check(fastfeat(["cache", "--data", str(self.task.target_data), "--weights", str(self.task.weights), *SMALL,
                            "--out", str(path), "--no-progress", "--overwrite"]), "cache")
        return path

    def head(self, seed: int) -> Path:
        return self.out / f"probe-seed{seed}.head.pt"


def check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"bench_transfer: {what} failed (exit code {code})")


def metrics_of(argv: list[str], path: Path) -> dict:
    check(fastfeat([*argv, "--metrics", str(path)]), argv[0])
    return json.loads(path.read_text())


def run_probe(ctx: Context, epochs: int, seed: int) -> dict:
    cache = ctx.cache()
    start = time.perf_counter()
    m = metrics_of(["train-head", "--cache", str(cache), "--out", str(ctx.head(seed)), "--seed", str(seed)],
                   ctx.out / f"probe-seed{seed}.json")
    return {"test_top1": m["test"]["top1"], "seconds": round(time.perf_counter() - start, 2)}


def run_knn(ctx: Context, epochs: int, seed: int) -> dict:
    m = metrics_of(["knn", "--cache", str(ctx.cache()), "--seed", str(seed)], ctx.out / f"knn-seed{seed}.json")
    return {"test_top1": m["test"]["top1"], "k": m["best_k"], "seconds": m["seconds"]}


def finetune_run(preset: str) -> Callable[[Context, int, int], dict]:
    """`fastfeat finetune --augment preset --init-head` the seed's probe head, defaults otherwise."""

    def run(ctx: Context, epochs: int, seed: int) -> dict:
        with tempfile.TemporaryDirectory(dir=ctx.out) as tmp:
            options = {"init_head": str(ctx.head(seed)), **ctx.finetune_options}  # --set init_head=null: a fresh head
            opts = FinetuneOptions(data=str(ctx.task.target_data), weights=str(ctx.task.weights), resize=32,
                                   image_size=32, augment=preset, epochs=epochs, seed=seed, checkpoint_dir=tmp,
                                   progress=False, **options)
            start = time.perf_counter()
            result = finetune(opts, log=lambda line: None)
        history = result.history
        return {"test_top1": result.test["top1"], "best_test_top1": result.best_test["top1"],
                "epoch0_valid_acc": history[0]["valid_acc"], "final_valid_acc": history[-1]["valid_acc"],
                "images_per_second": result.metrics()["train_images_per_second"],
                "epoch_seconds": round(result.metrics()["seconds"] / len(history), 2),
                "seconds": round(time.perf_counter() - start, 2), "loader": result.loader}

    return run


def run_plain(ctx: Context, epochs: int, seed: int) -> dict:
    """The plain script from the pretrained weights, a fresh 5-way fc (seeded), all of the train split."""
    dataset = open_dataset(ctx.task.target_data, "cifar10")
    train, test = (tensors(dataset.splits[s]) for s in ("train", "test"))
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=len(ctx.task.classes))
    state = {k: v for k, v in torch.load(ctx.task.weights, weights_only=True).items() if not k.startswith("fc.")}
    model.load_state_dict(state, strict=False)
    trained = plain_train(model, *train, PlainSettings(epochs=epochs, seed=seed))
    return {"test_top1": accuracy(model, *test), "images_per_second": trained["images_per_second"],
            "epoch_seconds": round(trained["seconds"] / epochs, 2), "seconds": trained["seconds"]}


@dataclass(frozen=True)
class Run:
    name: str
    run: Callable[[Context, int, int], dict]
    epochs: bool = True  # False: the same for any number of epochs (run once per seed)


RUNS = [
    Run("probe (train-head)", run_probe, epochs=False),  # first: the finetune runs start from its head
    Run("knn", run_knn, epochs=False),
    *(Run(f"finetune --augment {preset}", finetune_run(preset)) for preset in AUGMENT_PRESETS),
    Run("plain script", run_plain),
]


def summarise(results: list[dict]) -> dict:
    """Mean and spread (max - min) of each number over the seeds."""
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: {"mean": round(statistics.fmean(r[k] for r in results), 4),
                "spread": round(max(r[k] for r in results) - min(r[k] for r in results), 4)} for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 directory (default: generate images)")
    p.add_argument("--out", type=Path, default=Path("data/transfer-bench"), help="task, cache and heads (reused)")
    p.add_argument("--epochs", default="4,10", help="comma-separated fine-tuning lengths")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--runs", default=None, help="comma-separated substrings: only the runs whose name has one")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="a FinetuneOptions field for every finetune run (e.g. lr=0.05), repeatable")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_transfer.json"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    epochs_list = [int(e) for e in args.epochs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = {k.replace("-", "_"): json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    args.out.mkdir(parents=True, exist_ok=True)
    data, described = data_or_sample(args.data, 500, args.out)
    start = time.perf_counter()
    task = build_transfer_task(data, args.out, args.pretrain_epochs)
    print(f"data: {described}; source-task test accuracy {task.source_test_accuracy:.4f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    ctx = Context(task, args.out, overrides)
    wanted = [r for r in RUNS if args.runs is None or any(part in r.name for part in args.runs.split(","))]
    rows = []
    for run in wanted:
        for epochs in epochs_list if run.epochs else [None]:
            results = [run.run(ctx, epochs or 0, seed) for seed in seeds]
            row = {"run": run.name, "epochs": epochs, "per_seed": results, **summarise(results)}
            rows.append(row)
            ips = row.get("images_per_second", {}).get("mean")
            print(f"{run.name:<34} {'' if epochs is None else epochs:>6} test {row['test_top1']['mean']:.4f} "
                  f"± {row['test_top1']['spread'] / 2:.4f}" + (f"  {ips:8.1f} img/s" if ips else ""), flush=True)
    write_json(args.json, {
        "benchmark": "transfer", "data": described, "seeds": seeds, "epochs": epochs_list,
        "source_test_accuracy": task.source_test_accuracy, "finetune_overrides": overrides,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
                    "platform": platform.platform(), "load": os.getloadavg()},
        "rows": rows,
    })


if __name__ == "__main__":
    main()
