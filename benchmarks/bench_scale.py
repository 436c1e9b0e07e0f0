"""Features bigger than memory, measured as the rows grow: synthetic fp16 caches of N x 512 rows, each
streamed under a --memory-budget smaller than its features, for one sgd head, the 48-head sweep and kNN:
seconds per epoch, rows/s and peak RSS (each measurement in a child process of its own, read with
/proc's VmHWM, else resource.getrusage), beside the read of the same blocks alone and, up to --in-memory
rows, the same head with the features in memory; the fitted exponent of time against rows; with --plot, time
and peak RSS against rows (log-log); the table appended to docs/results.md (with --append).

    python benchmarks/bench_scale.py --rows 50000,200000,1000000,4000000 --budget 64MB --plot docs/scale.png --append
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIM, CLASSES, TEST_ROWS = 512, 10, 1000
IN_MEMORY = "16GB"  # the budget of the in-memory head
WHAT = ("read", "head", "memory", "sweep", "knn")  # memory: the head in memory


def write_synthetic(path: Path, rows: int, seed: int = 0) -> Path:
    """A cache of `rows` train rows (and TEST_ROWS test rows) of class-shifted fp16 noise, written in chunks."""
    from fastfeat.cache import cache_attrs
    from fastfeat.cache_file import CacheWriter
    from fastfeat.sources import Dataset
    from fastfeat.spec import FeatureSpec
    from fastfeat.transforms import Preprocess

    if path.exists():
        return path
    names = tuple(f"c{i}" for i in range(CLASSES))
    attrs = cache_attrs(Dataset("folder", path.parent, names, {}),
                        FeatureSpec("resnet18", "none:seed=0", "0" * 64, DIM, Preprocess(), "bfloat16"), 128)
    writer = CacheWriter(path, attrs, {"train": rows, "test": TEST_ROWS}, DIM)
    rng = np.random.default_rng(seed)
    for split, n in (("train", rows), ("test", TEST_ROWS)):
        for start in range(0, n, 65536):
            count = min(65536, n - start)
            y = rng.integers(0, CLASSES, count)
            x = rng.normal(0, 1, (count, DIM)).astype(np.float32)
            x[np.arange(count), y] += 2.0
            writer.write(split, start, x.astype(np.float16), y)
    writer.finish()
    writer.close()
    return path


def child(what: str, cache: str, budget: str) -> dict:
    """One measurement in this (child) process; its peak RSS with it."""
    import torch

    from fastfeat.budget import StreamPlan
    from fastfeat.head import HeadOptions, train_head
    from fastfeat.knn import KnnOptions, knn_evaluate
    from fastfeat.options import parse_size

    torch.set_num_threads(2)
    lines: list[str] = []
    start = time.perf_counter()
    if what == "read":
        from fastfeat.cache_file import BlockReader

        plan = StreamPlan.for_splits(cache, ("train", "test"), parse_size(budget), torch.device("cpu"))
        for _ in BlockReader(cache, "train", plan.block_rows).blocks():
            pass
        seconds = time.perf_counter() - start
    elif what == "knn":
        seconds = knn_evaluate(KnnOptions(cache=cache, k=(10, 20), val_fraction=0, device="cpu",
                                          memory_budget=budget), log=lines.append).seconds
    else:
        opts = HeadOptions(cache=cache, out=f"{cache}.{what}.pt", device="cpu", epochs=2, val_fraction=0.1,
                           memory_budget=IN_MEMORY if what == "memory" else budget, sweep=what == "sweep", refit=False)
        result = train_head(opts, log=lines.append)
        seconds = result.sweep["seconds"] / 2 if what == "sweep" else min(e["seconds"] for e in result.history)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
            "streamed": any(line.startswith("streaming") for line in lines)}


def peak_rss_mb() -> float:
    """This process's peak RSS: /proc's VmHWM (getrusage's ru_maxrss keeps the forking parent's peak across
    exec on Linux), getrusage where there is no /proc."""
    for line in Path("/proc/self/status").read_text().splitlines() if Path("/proc/self/status").exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(what: str, cache: Path, budget: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, str(cache), "--budget", budget],
                         capture_output=True, text=True, check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    return (f"{model}, torch {torch.__version__} cpu capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{os.cpu_count()} cores, no GPU")


def table(results: dict[int, dict[str, dict]]) -> list[str]:
    lines = ["| rows | read s (rows/s) | head s/epoch (rows/s, RSS MB) | in memory s/epoch (RSS MB) | "
             "sweep 48 s/epoch (rows/s, RSS MB) | knn s (RSS MB) | head / read | head / in memory | sweep / head |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rows, r in sorted(results.items()):
        cell = lambda w: f"{r[w]['seconds']:.2f} ({rows / r[w]['seconds']:,.0f}, {r[w]['peak_rss_mb']:.0f})"  # noqa: E731
        memory = r.get("memory")
        lines.append(f"| {rows:,} | {r['read']['seconds']:.2f} ({rows / r['read']['seconds']:,.0f}) | {cell('head')} | "
                     + (f"{memory['seconds']:.2f} ({memory['peak_rss_mb']:.0f}) | " if memory else "not run | ")
                     + f"{cell('sweep')} | {r['knn']['seconds']:.2f} ({r['knn']['peak_rss_mb']:.0f}) | "
                     f"{r['head']['seconds'] / r['read']['seconds']:.2f} | "
                     + (f"{r['head']['seconds'] / memory['seconds']:.2f} | " if memory else "| ")
                     + f"{r['sweep']['seconds'] / r['head']['seconds']:.2f} |")
    if len(results) > 1:
        sizes = sorted(results)
        fits = {w: np.polyfit(np.log(sizes), np.log([results[n][w]["seconds"] for n in sizes]), 1)[0]
                for w in ("read", "head", "sweep", "knn")}
        lines.append("")
        lines.append("fitted exponent of seconds against rows: " + ", ".join(f"{w} {e:.2f}" for w, e in fits.items()))
    return lines


def plot(results: dict[int, dict[str, dict]], path: Path) -> None:
    """Seconds and peak RSS against rows, log-log, one line per measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, (time_axis, rss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    names = {"read": "read alone", "head": "sgd head epoch", "memory": "sgd head epoch in memory",
             "sweep": "48-head sweep epoch", "knn": "kNN search"}
    for colour, (what, name) in enumerate(names.items()):
        have = [n for n in sizes if what in results[n]]
        style = dict(marker="o", color=f"C{colour}", label=name)
        time_axis.loglog(have, [results[n][what]["seconds"] for n in have], **style)
        if what != "read":
            rss_axis.loglog(have, [results[n][what]["peak_rss_mb"] for n in have], **style)
    time_axis.set(xlabel="train rows (x 512, float16)", ylabel="seconds", title="time")
    rss_axis.set(xlabel="train rows (x 512, float16)", ylabel="peak RSS (MB)", title="peak RSS")
    for axis in (time_axis, rss_axis):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="50000,200000,1000000,4000000", help="comma-separated train rows")
    parser.add_argument("--budget", default="64MB", help="the --memory-budget (below every cache's features)")
    parser.add_argument("--dir", default="/tmp/fastfeat-scale", help="where the synthetic caches go")
    parser.add_argument("--in-memory", type=int, default=1_000_000, help="the most rows the in-memory head runs on")
    parser.add_argument("--plot", type=Path, help="write time and RSS against rows (a PNG) there")
    parser.add_argument("--append", action="store_true", help="append the table to docs/results.md")
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.budget)))
        return
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    results = {}
    for rows in (int(r) for r in args.rows.split(",")):
        cache = write_synthetic(Path(args.dir) / f"scale-{rows}.h5", rows)
        results[rows] = {what: measure(what, cache, args.budget) for what in WHAT
                         if what != "memory" or rows <= args.in_memory}
        assert all(results[rows][w]["streamed"] for w in ("head", "sweep", "knn")), results[rows]
        assert "memory" not in results[rows] or not results[rows]["memory"]["streamed"], results[rows]
        print(json.dumps({rows: results[rows]}), flush=True)
    lines = table(results)
    print("\n".join(lines))
    if args.plot:
        plot(results, args.plot)
    if args.append:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        header = [f"\n## Streamed from the cache as the rows grow ({datetime.now(timezone.utc):%Y-%m-%d})", "",
                  f"Machine: {machine()}. Commit {commit}. Command: `python benchmarks/bench_scale.py --rows "
                  f"{args.rows} --budget {args.budget}{f' --plot {args.plot}' if args.plot else ''} --append`. "
                  f"Synthetic fp16 caches of N x {DIM}, {CLASSES} classes; every run streamed but the in-memory "
                  "head's; seconds per epoch the best of 2 (head) or the mean (sweep); kNN one search of "
                  f"{TEST_ROWS} test queries (k 10, 20); RSS the child process's peak.", ""]
        with open(REPO / "docs" / "results.md", "a") as f:
            f.write("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
