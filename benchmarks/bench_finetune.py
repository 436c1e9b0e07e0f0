"""Fine-tuning throughput at 224 px: fastfeat --amp and fp32 against the original recipe's loop.

The original loop: torchvision PIL transforms (the recipe's fine-tune augmentation) + DataLoader
with 2 workers + fp32 resnet18, batch 16, SGD over the whole network. fastfeat: `finetune()` with
its batched augmentation, channels_last, bf16 autocast (or fp32), optionally torch.compile. All on the
same images (`--data DIR`, or by default generated CIFAR-like images, see fastfeat.synthetic), in one
run; images/s is steady state: training steps only (no validation), after a warm-up (the original:
its first batch; fastfeat: a first epoch, so oneDNN/compile set-up is excluded).

    python benchmarks/bench_finetune.py [--images 512] [--json benchmarks/results/bench_finetune.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from fastfeat.finetune import FinetuneOptions, finetune
from fastfeat.reporting import write_json
from fastfeat.sources import open_dataset
from fastfeat.synthetic import data_or_sample

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RECIPE_AUGMENT = T.Compose([
    T.RandomResizedCrop(size=256, scale=(0.8, 1.0)), T.RandomRotation(degrees=15), T.ColorJitter(),
    T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD),
])


class RecipeDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a PIL image through the transform."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return RECIPE_AUGMENT(Image.fromarray(self.images[i])), int(self.labels[i])


def recipe_images_per_second(data: Path, n: int) -> float:
    split = open_dataset(data, "cifar10", ("train",), n).splits["train"]
    loader = torch.utils.data.DataLoader(RecipeDataset(split.images, split.labels), batch_size=16, shuffle=True, num_workers=2)
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Linear(512, 10)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, weight_decay=1e-3, momentum=0.9)  # the whole network
    criterion = torch.nn.CrossEntropyLoss()
    net.train()
    start, seen = None, 0
    for im, label in loader:
        loss = criterion(net(im), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if start is None:  # warm-up: worker start and the first step
            start = time.perf_counter()
        else:
            seen += len(label)
    return seen / (time.perf_counter() - start)


def fastfeat_images_per_second(data: Path, n: int, amp: bool, loader: str, batch_size: int, compile: bool) -> float:
    """Training images/s of the second of two epochs."""
    with tempfile.TemporaryDirectory() as tmp:
        result = finetune(FinetuneOptions(
            data=str(data), dataset="cifar10", limit=n, weights="none", device="cpu", loader=loader, amp=amp,
            batch_size=batch_size, epochs=2, checkpoint_dir=tmp, progress=False, compile=compile,
        ), log=lambda line: None)
    return result.history[-1]["train_images_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 directory (default: generate images)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader", default="torch", choices=["torch", "dali"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also time --amp --compile")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_finetune.json"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        data, described = data_or_sample(args.data, args.images, tmp)
        print(f"data: {described}", flush=True)
        rows = {"original recipe (PIL + DataLoader, fp32, batch 16)": recipe_images_per_second(data, args.images)}
        for amp, compile in ((False, False), (True, False), (True, True)) if args.compile else ((False, False), (True, False)):
            name = f"fastfeat finetune {'--amp bf16' if amp else 'fp32'}{' --compile' if compile else ''} ({args.loader}, batch {args.batch_size})"
            rows[name] = fastfeat_images_per_second(data, args.images, amp, args.loader, args.batch_size, compile)
            print(f"  {name}: {rows[name]:.1f} img/s", flush=True)
    base = next(iter(rows.values()))
    print(f"{'variant':<68} {'img/s':>8} {'vs original':>12}")
    for name, ips in rows.items():
        print(f"{name:<68} {ips:8.1f} {ips / base:11.2f}x")
    write_json(args.json, {
        "benchmark": "finetune", "data": described, "images": args.images, "image_size": 224,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform()},
        "rows": [{"variant": k, "images_per_second": round(v, 2), "speedup": round(v / base, 2)} for k, v in rows.items()],
    })


if __name__ == "__main__":
    main()
