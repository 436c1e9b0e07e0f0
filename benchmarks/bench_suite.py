"""`fastfeat suite` against the loop of separate commands it replaces, on generated CIFAR-like data: the
suite's wall time split into its backbone passes (its cache rows' seconds) and its probes (its probe rows'),
beside a loop of one `fastfeat cache` per (arch, dataset) and one `train-head`, `train-head --sweep` or `knn`
process per cell, each paying Python's and torch's start, and beside the backbone run again for every cell
(extrapolated from the loop's cache commands: one cache process per cell, then the suite's probe time).

Outside the suite the CLI cannot draw K-shot subsets, so the loop runs a K-shot cell as the full-train probe
with the trial's seed. `--loop-trials` runs the loop's probe processes for the first trials only and scales
their time to all of them (the table says so). Every run is a child process in `--workdir` (default a new
temporary folder, removed afterwards; a given one must be empty: a finished suite there would be skipped, not
timed). The table is printed, written with the settings to `--json`, and appended to docs/results.md with
`--append`.

    PYTHONPATH=$PWD python benchmarks/bench_suite.py --loop-trials 1 --append
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench_scale import machine

from fastfeat.reporting import write_json
from fastfeat.settings import FULL, SUITE_PROBES
from fastfeat.suite_report import CACHE, OK, ResultsTable, Row
from fastfeat.synthetic import CIFAR10_CLASSES, make_split, write_cifar10

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
# the generated datasets: name, classes, seed (a class's look depends on how many classes there are)
GENERATED = (("ten", CIFAR10_CLASSES, 1), ("five", CIFAR10_CLASSES[:5], 2))
PROBE_COMMAND = {"head": ("train-head",), "sweep": ("train-head", "--sweep"), "knn": ("knn",)}


@dataclass
class Run:
    """One row of the table: how it ran the cells, and where its seconds went."""

    name: str
    processes: int
    wall: float
    backbone: float
    probes: float
    images: int


def make_datasets(root: Path, count: int, train_images: int, test_images: int) -> dict[str, Path]:
    """The first `count` generated sets, as CIFAR-10 pickles under root/NAME."""
    data = {}
    for name, classes, seed in GENERATED[:count]:
        per_class = train_images // len(classes)
        train = make_split(per_class, classes, 0, (seed, 0))
        test = make_split(test_images // len(classes), classes, per_class, (seed, 1))
        write_cifar10(root / name, train, test, classes)
        data[name] = root / name
    return data


def fastfeat(*argv: str) -> float:
    """The wall seconds of one `python -m fastfeat` process, started as a user's shell starts it."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastfeat", *argv], capture_output=True, text=True, env=ENV)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"fastfeat {shlex.join(argv)} failed: {proc.stderr.strip()[-2000:]}")
    return seconds


def cache_flags(args: argparse.Namespace) -> list[str]:
    """The backbone settings the suite and the loop's caches share."""
    return ["--weights", "none", "--resize", str(args.resize), "--image-size", str(args.image_size),
            "--device", "cpu", "--no-progress"]


def run_suite(args: argparse.Namespace, data: dict[str, Path], out: Path) -> tuple[Run, dict[tuple, Row]]:
    """The one suite command, and its results.csv rows: cache rows are backbone time, the others probe time."""
    datasets = ",".join(f"{name}={path}" for name, path in data.items())
    wall = fastfeat("suite", "--archs", args.archs, "--datasets", datasets, "--probes", args.probes, "--shots",
                    args.shots, "--trials", str(args.trials), "--out", str(out), *cache_flags(args))
    rows = ResultsTable(out / "results.csv").rows
    failed = [row for row in rows.values() if row.status != OK]
    if failed:
        raise SystemExit(f"suite cells failed: {failed[0].key}: {failed[0].reason}")
    caches = [row for row in rows.values() if row.probe == CACHE]
    probes = [row for row in rows.values() if row.probe != CACHE]
    return Run("suite (one command)", 1, wall, sum(r.seconds for r in caches), sum(r.seconds for r in probes),
               sum(r.backbone_images for r in rows.values())), rows


def probe_argv(probe: str, cache: Path, trial: int, stem: Path) -> list[str]:
    """The command a user would type for one cell (a K-shot one as the full-train probe: no CLI draws shots)."""
    out = [] if probe == "knn" else ["--out", f"{stem}.head.pt"]
    return [*PROBE_COMMAND[probe], "--cache", str(cache), "--seed", str(trial), "--device", "cpu", *out,
            "--metrics", f"{stem}.json"]


@dataclass
class Loop:
    """What the loop measured: per (arch, dataset) its cache process (seconds, backbone images), per cell run
    its process's seconds and test top-1."""

    caches: dict[tuple[str, str], tuple[float, int]]
    cells: dict[tuple, tuple[float, float]]


def run_loop(args: argparse.Namespace, data: dict[str, Path], out: Path) -> Loop:
    """Per (arch, dataset) one cache process, then one process per (probe, shots, trial) of the first
    `loop_trials` trials."""
    (out / "caches").mkdir(parents=True)
    loop = Loop({}, {})
    for arch, (name, path) in itertools.product(args.archs.split(","), data.items()):
        cache, stem = out / "caches" / f"{name}-{arch}.h5", out / f"{name}-{arch}"
        wall = fastfeat("cache", "--data", str(path), "--arch", arch, "--out", str(cache), "--metrics",
                        f"{stem}-cache.json", *cache_flags(args))
        loop.caches[arch, name] = (wall, json.loads(Path(f"{stem}-cache.json").read_text())["backbone_images"])
        for probe, shots, trial in itertools.product(args.probes.split(","), args.shots.split(","),
                                                     range(args.loop_trials)):
            cell = out / f"{name}-{arch}-{probe}-{shots}-trial{trial}"
            wall = fastfeat(*probe_argv(probe, cache, trial, cell))
            top1 = json.loads(Path(f"{cell}.json").read_text())["test"]["top1"]
            loop.cells[arch, name, probe, shots, trial] = (wall, top1)
    return loop


def loop_run(loop: Loop, args: argparse.Namespace) -> Run:
    """The loop's row: its cache processes, and its probe processes scaled to every trial."""
    backbone = sum(wall for wall, _ in loop.caches.values())
    probes = sum(wall for wall, _ in loop.cells.values()) * args.trials / args.loop_trials
    cells = len(loop.cells) * args.trials // args.loop_trials
    return Run("loop of commands", len(loop.caches) + cells, backbone + probes, backbone, probes,
               sum(images for _, images in loop.caches.values()))


def per_cell_run(loop: Loop, suite: Run, cells: int) -> Run:
    """Every cell its own backbone pass (one cache process of its (arch, dataset)), then the suite's probe time."""
    each = cells // len(loop.caches)
    backbone = sum(wall for wall, _ in loop.caches.values()) * each
    return Run("backbone per cell (extrapolated)", cells, backbone + suite.probes, backbone, suite.probes,
               sum(images for _, images in loop.caches.values()) * each)


def agreement(loop: Loop, rows: dict[tuple, Row]) -> tuple[int, int]:
    """(full-shot cells where the loop's process gave the suite's top-1, full-shot cells the loop ran)."""
    full = [(key, top1) for key, (_, top1) in loop.cells.items() if key[3] == FULL]
    return sum(rows[key].top1 == top1 for key, top1 in full), len(full)


def table(runs: list[Run]) -> list[str]:
    suite = runs[0].wall
    lines = ["| run | processes | wall s | backbone s | probe s | backbone images | wall / suite's |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.processes} | {r.wall:.1f} | {r.backbone:.1f} | {r.probes:.1f} | {r.images:,} | "
              f"{r.wall / suite:.1f} |" for r in runs]
    return lines


def notes(args: argparse.Namespace, runs: list[Run], loop: Loop, agree: tuple[int, int], cells: int,
          load: tuple[float, float]) -> list[str]:
    """What each row's seconds are, what was measured rather than extrapolated, and how busy the machine was
    (other work on the cores slows small probes many times over)."""
    suite, measured = runs[0], sum(wall for wall, _ in (*loop.caches.values(), *loop.cells.values()))
    archs, probes, shots = (value.split(",") for value in (args.archs, args.probes, args.shots))
    return ["", f"{cells} probe cells: {len(archs)} archs ({', '.join(archs)}) x {args.datasets} datasets x "
            f"{len(probes)} probes ({', '.join(probes)}) x {len(shots)} shots ({', '.join(shots)}) x {args.trials} "
            "trials. Suite: backbone and probe seconds are its "
            f"results.csv rows' (the probe rows include drawing each K-shot cache); the other "
            f"{suite.wall - suite.backbone - suite.probes:.1f} s are its start and summary. Loop: the wall of each "
            "process, Python's and torch's start included; the CLI draws no K-shot subsets, so a K-shot cell runs "
            f"the full-train probe with the trial's seed; measured: {len(loop.caches)} cache and {len(loop.cells)} "
            f"probe processes ({args.loop_trials} of {args.trials} trials) in {measured:.1f} s, the probe "
            f"processes scaled by {args.trials}/{args.loop_trials}; full-shot top-1 equal to the suite's in "
            f"{agree[0]} of {agree[1]} cells. Backbone per cell: extrapolated, not run: every cell one cache "
            "process of its (arch, dataset) as the loop measured it, plus the suite's probe seconds. Load average "
            f"(1 min) {load[0]:.2f} at the start, {load[1]:.2f} at the end."]


def append(args: argparse.Namespace, lines: list[str]) -> None:
    """The table under a dated section of docs/results.md, with the machine, commit and command."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    command = shlex.join(["python", "benchmarks/bench_suite.py", *sys.argv[1:]])
    header = [f"\n## fastfeat suite against a loop of commands ({datetime.now(timezone.utc):%Y-%m-%d})", "",
              f"Machine: {machine()}. Commit {commit}. Command: `PYTHONPATH=$PWD {command}`. Generated CIFAR-like "
              f"pickles ({args.train_images} train and {args.test_images} test images per dataset, 10 and 5 "
              f"classes), `--weights none --resize {args.resize} --image-size {args.image_size} --device cpu`, "
              "every probe at its defaults.", ""]
    with open(REPO / "docs" / "results.md", "a") as f:
        f.write("\n".join(header + lines) + "\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="resnet18,mobilenet_v3_small,squeezenet1_1")
    parser.add_argument("--datasets", type=int, default=2, choices=range(1, len(GENERATED) + 1),
                        help="how many generated datasets")
    parser.add_argument("--probes", default=",".join(SUITE_PROBES), help="of head, sweep, knn")
    parser.add_argument("--shots", default="full,1,5,10")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--loop-trials", type=int, help="trials the loop runs, scaled to --trials (default: all)")
    parser.add_argument("--train-images", type=int, default=300, help="per dataset (kNN's k 200 needs 223)")
    parser.add_argument("--test-images", type=int, default=100, help="per dataset")
    parser.add_argument("--resize", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--workdir", help="an empty folder for the data, caches and results (default: a temporary one)")
    parser.add_argument("--json", help="also write the rows and settings to this JSON file")
    parser.add_argument("--append", action="store_true", help="append the table to docs/results.md")
    args = parser.parse_args()
    args.loop_trials = args.loop_trials or args.trials
    if not set(args.probes.split(",")) <= set(PROBE_COMMAND) or not 1 <= args.loop_trials <= args.trials:
        parser.error("--probes takes head, sweep, knn; --loop-trials 1 to --trials")
    if args.workdir and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    return args


def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    """Every run in `workdir`; the table and its notes printed, and returned with the rows."""
    load = os.getloadavg()[0]
    data = make_datasets(workdir / "data", args.datasets, args.train_images, args.test_images)
    suite, rows = run_suite(args, data, workdir / "suite")
    loop = run_loop(args, data, workdir / "loop")
    cells = sum(row.probe != CACHE for row in rows.values())
    runs = [suite, loop_run(loop, args), per_cell_run(loop, suite, cells)]
    agree = agreement(loop, rows)
    lines = table(runs) + notes(args, runs, loop, agree, cells, (load, os.getloadavg()[0]))
    print("\n".join(lines), flush=True)
    return {"lines": lines, "cells": cells, "runs": [asdict(r) for r in runs], "agree": agree,
            "loop_processes_run": len(loop.caches) + len(loop.cells),
            "settings": {k: v for k, v in vars(args).items() if k != "append"}}


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="fastfeat-bench-suite-") as tmp:
        result = benchmark(args, Path(args.workdir or tmp))
    if args.json:
        write_json(args.json, result)
    if args.append:
        append(args, result["lines"])


if __name__ == "__main__":
    main()
