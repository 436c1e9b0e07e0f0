"""`PYTHONPATH=$PWD python benchmarks/bench_block_read.py CACHE [--block-rows 9216] [--piece-rows 36]`: the
choices of `cache_file.BlockReader`, each against its alternative on one fastfeat cache (float16 features, in
the page cache: run it twice), in milliseconds for one pass over train:

- a gathered block's small pieces read through h5py slicing, or with `os.preadv` from their bytes;
- float16 blocks converted to float32 by numpy or by torch, into a fresh tensor or a reused buffer;
- finiteness by numpy's per-value check of the float16 rows, of the float32 ones, or by one torch sum;
- a streamed sgd epoch (`train-head --memory-budget 64MB`) reading the next block in a thread or in turn.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

from fastfeat import cache_file, runtime
from fastfeat.head import HeadOptions, train_head


def milliseconds(run: Callable[[], object], repeats: int = 2) -> float:
    """The best of `repeats` runs of `run`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 1)


def pieces(data: h5py.Dataset, cache: Path, piece_rows: int, block_rows: int) -> dict[str, float]:
    """One pass of shuffled pieces, a block's worth at a time, by each reader."""
    starts = np.random.default_rng(0).permutation(np.arange(0, len(data), piece_rows))
    groups = [sorted((int(a), min(len(data), int(a) + piece_rows)) for a in starts[at:at + block_rows // piece_rows])
              for at in range(0, len(starts), block_rows // piece_rows)]
    out = np.empty((block_rows, data.shape[1]), dtype=data.dtype)
    place = cache_file._FileRows.of(data, cache)
    fd = os.open(cache, os.O_RDONLY)
    try:
        return {"h5py slicing": milliseconds(lambda: [cache_file._read_ranges(data, g, out) for g in groups]),
                "preadv": milliseconds(lambda: [place.read(fd, g, out) for g in groups])}
    finally:
        os.close(fd)


def conversions(block: np.ndarray, blocks: int) -> dict[str, float]:
    buffer = torch.empty(block.shape)
    return {"numpy astype": milliseconds(lambda: [block.astype(np.float32) for _ in range(blocks)]),
            "torch, fresh tensor": milliseconds(lambda: [torch.from_numpy(block).float() for _ in range(blocks)]),
            "torch, reused buffer": milliseconds(lambda: [buffer.copy_(torch.from_numpy(block)) for _ in range(blocks)])}


def finiteness(block: np.ndarray, blocks: int) -> dict[str, float]:
    converted = torch.from_numpy(block).float()
    return {"numpy, float16": milliseconds(lambda: [np.isfinite(block).all() for _ in range(blocks)]),
            "numpy, float32": milliseconds(lambda: [np.isfinite(converted.numpy()).all() for _ in range(blocks)]),
            "torch sum": milliseconds(lambda: [torch.isfinite(converted.sum()) for _ in range(blocks)])}


def read_ahead(cache: Path) -> dict[str, float]:
    """Milliseconds of the best of three streamed sgd epochs, with and without the read-ahead thread, twice."""
    real, found = runtime.core_to_spare, {}
    for ahead in (True, False, True, False):
        runtime.core_to_spare = lambda device, ahead=ahead: ahead  # what BlockReader asks
        opts = HeadOptions(cache=str(cache), out=f"{cache}.ahead.pt", device="cpu", epochs=3, memory_budget="64MB")
        seconds = min(epoch["seconds"] for epoch in train_head(opts, log=lambda line: None).history)
        key = "read ahead in a thread" if ahead else "read in turn"
        found[key] = min(found.get(key, float("inf")), round(seconds * 1000, 1))
    runtime.core_to_spare = real
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--block-rows", type=int, default=9216)
    parser.add_argument("--piece-rows", type=int, default=36)
    args = parser.parse_args()
    with h5py.File(args.cache, "r", rdcc_nbytes=0) as f:
        data = f["train"]["features"]
        block, blocks = data[:args.block_rows], -(-len(data) // args.block_rows)
        print(f"{len(data)} rows x {data.shape[1]} {data.dtype}, blocks of {args.block_rows} rows ({blocks}), "
              f"pieces of {args.piece_rows}; torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")
        for name, found in (("pieces", pieces(data, args.cache, args.piece_rows, args.block_rows)),
                            ("float16 -> float32", conversions(block, blocks)), ("finiteness", finiteness(block, blocks))):
            print(f"{name}: " + ", ".join(f"{k} {v} ms" for k, v in found.items()))
    print("streamed sgd epoch: " + ", ".join(f"{k} {v} ms" for k, v in read_ahead(args.cache).items()))


if __name__ == "__main__":
    main()
