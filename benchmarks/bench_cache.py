"""Feature-extraction throughput: the original recipe against `fastfeat cache`, on the same images.

Measures images/second, in one process and on `--images` CIFAR-10 training images (from `--data DIR`,
or by default generated CIFAR-like images, see fastfeat.synthetic), of:

- **original**: the usual transfer-learning recipe's backbone pass: a torchvision-CIFAR10-style
  dataset with PIL `Resize(256)`, `CenterCrop(224)`, `ToTensor()`, `Normalize(ImageNet)`,
  `DataLoader(batch_size=64, num_workers=2)` and a frozen fp32 resnet18 (`fc` = identity) in eval
  mode under `torch.no_grad()`;
- **fastfeat**: `build_cache` for each loader in `--loaders` (DALI skipped when not installed), with
  its defaults (AMP, channels_last) and, with `--compile` (the default), also with `torch.compile`;
  its time includes writing the HDF5 cache.

`--arch` picks the backbone (default resnet18; the original pipeline then uses that arch's own
preprocessing). Every variant uses the same random-init weights (written to a temporary file, since
pretrained weights may not be downloadable) and runs once untimed on a few images (one full and one
tail batch, so compiled graphs and oneDNN primitives are warm), then timed on all of them.

Run from the repository root:

    python benchmarks/bench_cache.py [--arch resnet18] [--images 1024] [--loaders dali,torch] [--no-compile] [--fp32]

It prints a table and writes it, with the parameters and machine info, to `--json`.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from fastfeat.backbone import DEFAULT_ARCH, Backbone, build_backbone
from fastfeat.cache import CacheOptions, build_cache
from fastfeat.loaders import dali_available
from fastfeat.reporting import write_json
from fastfeat.sources import open_dataset
from fastfeat.synthetic import data_or_sample

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_BATCH, ORIGINAL_WORKERS = 64, 2

Run = Callable[[int], dict]  # images -> {"images": processed, "seconds": ..., "precision": ...}


class CifarArrays(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: PIL image from the uint8 array, transform, label."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def original_run(data: Path, backbone: Backbone, device: torch.device) -> Run:
    pre = backbone.spec.pre
    transform = transforms.Compose([
        transforms.Resize(pre.resize, interpolation=transforms.InterpolationMode(pre.interpolation)),
        transforms.CenterCrop(pre.image_size), transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std),
    ])
    net = backbone.model
    for p in net.parameters():
        p.requires_grad_(False)
    net = net.eval().to(device)

    def run(images: int) -> dict:
        split = open_dataset(data, "cifar10", ("train",), limit=images).splits["train"]
        loader = torch.utils.data.DataLoader(
            CifarArrays(split.images, split.labels, transform), batch_size=ORIGINAL_BATCH, num_workers=ORIGINAL_WORKERS
        )
        start, done = time.perf_counter(), 0
        with torch.no_grad():
            for im, _ in loader:
                done += len(net(im.to(device)).cpu())
        return {"images": done, "seconds": time.perf_counter() - start, "precision": "float32"}

    return run


def fastfeat_run(data: Path, arch: str, weights: Path, device: torch.device, loader: str, batch_size: int,
                 compile: bool, amp: bool, out: Path) -> Run:
    def run(images: int) -> dict:
        result = build_cache(CacheOptions(
            data=str(data), dataset="cifar10", splits=("train",), limit=images, loader=loader, arch=arch,
            weights=str(weights), device=str(device), batch_size=batch_size, out=str(out), overwrite=True,
            progress=False, compile=compile, amp=amp,
        ))
        return {"images": result.images, "seconds": result.seconds, "precision": result.precision,
                "loader": result.loader, "compile": compile}

    return run


def measure(name: str, run: Run, images: int, batch_size: int) -> dict:
    """Warm up on one full and one tail batch (the shapes the timed run meets), then time all images."""
    run(min(images, batch_size + images % batch_size))
    result = run(images)
    row = {"name": name, **result, "seconds": round(result["seconds"], 3),
           "images_per_second": round(result["images"] / result["seconds"], 2)}
    print(f"  {name}: {row['images_per_second']} images/s", flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    width = max(len(r["name"]) for r in rows)
    print(f"\n{'variant':<{width}}  {'images':>6}  {'seconds':>8}  {'images/s':>9}  {'speed-up':>8}")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['images']:>6}  {r['seconds']:>8.2f}  {r['images_per_second']:>9.2f}"
              f"  {r['speedup']:>7.2f}x")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="directory holding cifar-10-batches-py/ (default: generate CIFAR-like images)")
    parser.add_argument("--arch", default=DEFAULT_ARCH, help="backbone (any torchvision classification model)")
    parser.add_argument("--images", type=int, default=1024, help="training images to run through every variant")
    parser.add_argument("--batch-size", type=int, default=128, help="fastfeat batch size (the original uses 64)")
    parser.add_argument("--loaders", default="dali,torch", help="comma-separated fastfeat loaders")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time fastfeat with torch.compile")
    parser.add_argument("--fp32", action=argparse.BooleanOptionalAction, default=False,
                        help="also time fastfeat without mixed precision")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (every variant)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "bench_cache.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(os.cpu_count())
    device = torch.device(args.device)
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    if "dali" in loaders and not dali_available():
        print("note: nvidia.dali is not importable, skipping the dali loader")
        loaders.remove("dali")
    with tempfile.TemporaryDirectory() as tmp:
        data, described = data_or_sample(args.data, args.images, tmp, test_images=0)
        print(f"data: {described}", flush=True)
        weights = Path(tmp) / f"{args.arch}.pth"
        torch.save(build_backbone(args.arch, "none").model.state_dict(), weights)
        backbone = build_backbone(args.arch, str(weights))
        print(f"backbone: {args.arch}, {backbone.spec.feature_dim}-d features, {backbone.spec.pre}", flush=True)
        rows = [measure("original (PIL + DataLoader, fp32)", original_run(data, backbone, device),
                        args.images, ORIGINAL_BATCH)]
        variants = [(amp, compile) for amp in ((True, False) if args.fp32 else (True,))
                    for compile in ((False, True) if args.compile else (False,))]
        for loader in loaders:
            for amp, compile in variants:
                run = fastfeat_run(data, args.arch, weights, device, loader, args.batch_size, compile, amp,
                                   Path(tmp) / "cache.h5")
                name = f"fastfeat {loader} (" + ("amp" if amp else "fp32") + (", compile)" if compile else ")")
                rows.append(measure(name, run, args.images, args.batch_size))
    for row in rows:
        row["speedup"] = round(row["images_per_second"] / rows[0]["images_per_second"], 2)
    print_table(rows)
    write_json(args.json, {
        "rows": rows,
        "parameters": {
            "data": described, "arch": args.arch, "images": args.images, "batch_size": args.batch_size,
            "original_batch_size": ORIGINAL_BATCH, "original_workers": ORIGINAL_WORKERS,
            "loaders": loaders, "compile": args.compile, "fp32": args.fp32,
        },
        "machine": {
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "platform": platform.platform(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
    })
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
