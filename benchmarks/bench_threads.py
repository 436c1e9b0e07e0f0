"""`PYTHONPATH=$PWD python benchmarks/bench_threads.py [--loaders dali,torch] [--images 256] [--what cache]`:
decode threads against the model's intra-op threads. For every split of this machine's cores (torch's
threads x the loader's workers: DALI threads or DataLoader processes) it runs `fastfeat bench` (loader only,
model only, end to end, best of --repeats) in this one process and prints one JSON line per split, the
fastest end to end last."""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

import fastfeat.runtime as runtime
from fastfeat.bench import benchmark
from fastfeat.settings import BenchOptions


def with_loader_workers(count: int) -> None:
    """Every module that imported `runtime.loader_workers` now gets `count`."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("fastfeat") and hasattr(module, "loader_workers"):
            module.loader_workers = lambda count=count: count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--what", default="cache", choices=("cache", "finetune"))
    parser.add_argument("--loaders", default="dali,torch")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = runtime.loader_workers()
    splits = list(itertools.product(range(1, cores + 1), range(1, cores + 1)))
    results = []
    for loader, (torch_threads, loader_threads) in itertools.product(args.loaders.split(","), splits):
        torch.set_num_threads(torch_threads)
        with_loader_workers(loader_threads)
        opts = BenchOptions(what=args.what, loader=loader, images=args.images, repeats=args.repeats, device="cpu")
        result = benchmark(opts)
        row = {"loader": loader, "torch_threads": torch_threads, "loader_workers": loader_threads,
               **{stage: round(result.best(stage), 1) for stage in ("loader", "model", "end_to_end")}}
        results.append(row)
        print(json.dumps(row), flush=True)
    print("fastest:", json.dumps(max(results, key=lambda row: row["end_to_end"])))


if __name__ == "__main__":
    main()
