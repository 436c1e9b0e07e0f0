"""`PYTHONPATH=$PWD python benchmarks/bench_cache_rss.py [--images 10000,100000,300000] [--sources folder,webdataset]`:
`fastfeat cache`'s peak RSS as the images grow. For each count, a folder of that many 32-px JPEGs (10 classes,
and 100 test images; as WebDataset shards of 1,000 too) is cached by resnet18 with random weights at 32 px, eager
(so the backbone, and a compile's memory, do not hide the rest), each run in a child process of its own (peak RSS from /proc's
VmHWM; the torch loader's worker processes apart, the largest one's from getrusage); then the RSS each further 100,000 images add (a least-squares line). Flat memory means a small slope
beside what the rows themselves need: the file list, 4 bytes of label and 2 x 512 bytes of features a row
written as they come."""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PER_SHARD, TEST_IMAGES = 1000, 100


def write_data(root: Path, images: int) -> Path:
    """`root`/folder (train of `images`, test of TEST_IMAGES) and `root`/webdataset, written in parts."""
    from fastfeat.synthetic import CIFAR10_CLASSES, make_split, write_folder, write_shards

    folder = root / "folder"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        per_class, part = images // 10, 1000
        test = make_split(TEST_IMAGES // 10, seed=10**6)
        for first in range(0, per_class, part):  # (the same test images each part: write_folder writes both)
            write_folder(folder, make_split(min(part, per_class - first), first=first, seed=first), test, CIFAR10_CLASSES)
        write_shards(folder, root / "webdataset", PER_SHARD)
        (root / "done").touch()
    return root


def child(argv: list[str]) -> dict:
    """`fastfeat cache argv` in this process; its seconds and peak RSS."""
    from fastfeat.cli import main

    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return {"code": code, "seconds": seconds, "peak_rss_mb": int(hwm.split()[1]) / 1024,
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def measure(root: Path, images: int, source: str, loader: str) -> dict:
    last = -(-images // PER_SHARD) - 1
    data = ["--data", str(root / "folder")] if source == "folder" else [
        "--dataset", "webdataset", "--train-data", str(root / f"webdataset/train/train-{{000000..{last:06d}}}.tar"),
        "--test-data", str(root / "webdataset/test/test-000000.tar")]
    out = root / f"{source}-{loader}.h5"
    out.unlink(missing_ok=True)
    argv = ["cache", *data, "--arch", "resnet18", "--weights", "none", "--resize", "32", "--image-size", "32",
            "--loader", loader, "--no-compile", "--out", str(out), "--no-progress"]  # (a compile's memory aside)
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    if done.returncode:
        raise SystemExit(f"{source} {loader}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="10000,100000,300000")
    parser.add_argument("--sources", default="folder,webdataset")
    parser.add_argument("--loaders", default="dali,torch")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fastfeat-cache-rss"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    counts = [int(n) for n in args.images.split(",")]
    runs = [(s, loader) for s in args.sources.split(",") for loader in args.loaders.split(",")]
    found = {}
    for images in counts:
        root = write_data(args.dir / str(images), images)
        found[images] = {run: measure(root, images, *run) for run in runs}
        print(json.dumps({images: {f"{s} {loader}": r for (s, loader), r in found[images].items()}}), flush=True)
    print("| images | " + " | ".join(f"{s}, {loader}: peak RSS MB (largest worker's; s)" for s, loader in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for images in counts:
        cells = [f"{r['peak_rss_mb']:.0f} ({r['worker_peak_rss_mb']:.0f}; {r['seconds']:.0f} s)"
                 for r in (found[images][run] for run in runs)]
        print(f"| {images:,} | " + " | ".join(cells) + " |")
    if len(counts) > 1:
        slopes = [np.polyfit(counts, [found[n][run]["peak_rss_mb"] for n in counts], 1)[0] * 1e5 for run in runs]
        print("peak RSS added by 100,000 images: " + ", ".join(
            f"{s} {loader} {slope:.1f} MB" for (s, loader), slope in zip(runs, slopes)))


if __name__ == "__main__":
    main()
