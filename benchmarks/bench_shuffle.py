"""`PYTHONPATH=$PWD python benchmarks/bench_shuffle.py`: the streamed shuffle against the full one. The same
sgd and AdamW heads (10 epochs, default options) trained in memory (a `torch.randperm` of all rows an epoch)
and streamed under an 8MB --memory-budget (blocks gathered from small pieces all over the file, the rows
shuffled inside each block), on 20,000 x 512 synthetic fp16 rows of 10 hard classes in random row order and
sorted by class (as a folder dataset is cached); beside each, the mean number of classes a batch holds.
`--seeds 0,1,2`: the heads for each seed (the shuffles' and inits'), and the mean top1 over them."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import write_cache  # noqa: E402

from fastfeat.budget import StreamPlan  # noqa: E402
from fastfeat.cache_file import BlockReader  # noqa: E402
from fastfeat.head import HeadOptions, train_head  # noqa: E402
from fastfeat.options import parse_size  # noqa: E402
from fastfeat.rows import StreamedRows  # noqa: E402

CLASSES, DIM, BUDGETS = 10, 512, {"full shuffle": "1GB", "streamed": "8MB"}


def make(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise rows whose class adds 1.4 sd in one of the first CLASSES dimensions."""
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(0, 1, (n, DIM)).astype(np.float32)
    x[:, :CLASSES] += 1.4 * np.eye(CLASSES)[y]
    return x.astype(np.float16), y


def classes_a_batch(cache: Path, budget: str, batch_size: int) -> float:
    """The mean number of classes a batch of one epoch's shuffle holds (over all train rows)."""
    labels = BlockReader(cache, "train", 1).labels()
    generator = torch.Generator().manual_seed(0)
    plan = StreamPlan.for_splits(str(cache), ("train", "test"), parse_size(budget), torch.device("cpu"))
    if plan.streams:
        batches = [y for _, y in StreamedRows(BlockReader(cache, "train", plan.block_rows), None, labels)
                   .shuffled(batch_size, generator)]
    else:
        batches = [torch.from_numpy(labels)[i] for i in torch.randperm(len(labels), generator=generator).split(batch_size)]
    return float(np.mean([len(torch.unique(y)) for y in batches]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="comma-separated head seeds")
    seeds = [int(seed) for seed in parser.parse_args().seeds.split(",")]
    rng = np.random.default_rng(0)
    (x, y), test = make(20000, rng), make(5000, rng)
    order = np.argsort(y, kind="stable")
    for name, (tx, ty) in (("random order", (x, y)), ("sorted by class", (x[order], y[order]))):
        path = Path(f"/tmp/fastfeat-shuffle-{name.split()[0]}.h5")
        path.unlink(missing_ok=True)
        write_cache(path, {"train": (tx, ty), "test": test}, classes=[str(i) for i in range(CLASSES)])
        classes = {kind: classes_a_batch(path, budget, HeadOptions().batch_size) for kind, budget in BUDGETS.items()}
        for opt in ("sgd", "adamw"):
            top1 = {kind: [head_top1(path, opt, budget, seed) for seed in seeds] for kind, budget in BUDGETS.items()}
            print(f"{name} {opt}: test top1 " + ", ".join(
                f"{kind} {np.mean(top1[kind]):.4f} {[round(a, 4) for a in top1[kind]]} ({classes[kind]:.2f} classes a batch)"
                for kind in BUDGETS), flush=True)


def head_top1(cache: Path, optimizer: str, budget: str, seed: int) -> float:
    opts = HeadOptions(cache=str(cache), out="/tmp/fastfeat-shuffle.pt", device="cpu", epochs=10, optimizer=optimizer,
                       memory_budget=budget, seed=seed)
    return train_head(opts, log=lambda line: line.startswith("streaming") and seed == 0 and print(line)).test["top1"]


if __name__ == "__main__":
    main()
