"""A transfer task built from CIFAR-10-layout data, and the plain fine-tuning script to compare against.

ImageNet weights cannot be downloaded everywhere, so the benchmarks make their own "pretrained"
backbone: a resnet18 trained from scratch (plain loop below) on the *source* classes at 32 px, saved
as a state-dict file (`--weights FILE` for fastfeat). The *target* classes become a dataset of their
own, written in CIFAR-10's python layout (labels renumbered 0..K-1), which fastfeat reads like any
CIFAR-10 directory. The same task serves the fine-tune benchmarks and the cached-views benchmarks.

`plain_train` is the reference the issue names: random crop (pad 4, reflect) + horizontal flip,
nesterov SGD with a one-cycle lr, label smoothing 0.1, bf16 autocast; airbench-style, the data stays
in one uint8 tensor and each augmentation is a batched tensor function.

    python benchmarks/transfer_task.py --data ../shared/data/cifar10-sample --out data/transfer
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from fastfeat.sources import open_dataset
from fastfeat.synthetic import ImageSet, write_cifar10

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


@dataclass(frozen=True)
class PlainSettings:
    """The plain script's hyper-parameters (the issue's reference row)."""

    epochs: int = 4
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    pad: int = 4
    seed: int = 0


@dataclass(frozen=True)
class TransferTask:
    target_data: Path  # CIFAR-10 layout with only the target classes
    weights: Path  # resnet18 state dict pretrained on the source classes (fc dropped by fastfeat)
    source_test_accuracy: float
    classes: tuple[str, ...]


def tensors(rows: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and int64 labels."""
    return torch.from_numpy(rows.images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(rows.labels)


def crop_flip(images: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Random crop of the reflect-padded batch (one offset per image) + horizontal flip half the time."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images.float(), (pad,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=g) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 3, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 3, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images / 255 - MEAN) / STD


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    hits = 0
    for start in range(0, len(labels), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(normalize(images[start : start + batch_size].float()).contiguous(memory_format=torch.channels_last))
        hits += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return hits / len(labels)


def plain_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, s: PlainSettings) -> dict:
    """Train `model` (all of it) on uint8 NCHW `images`; returns img/s and seconds."""
    g = torch.Generator().manual_seed(s.seed)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, nesterov=True, weight_decay=s.weight_decay)
    steps = s.epochs * (len(labels) // s.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=max(steps, 1))
    criterion = nn.CrossEntropyLoss(label_smoothing=s.label_smoothing)
    start = time.perf_counter()
    for _ in range(s.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=g)
        for first in range(0, len(order) - s.batch_size + 1, s.batch_size):  # full batches only
            rows = order[first : first + s.batch_size]
            batch = normalize(crop_flip(images[rows], s.pad, g)).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = criterion(model(batch).float(), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "images_per_second": round(steps * s.batch_size / seconds, 1)}


def subset(split, classes: tuple[int, ...], names: tuple[str, ...]) -> ImageSet:
    """The rows of `classes`, labels renumbered 0..len(classes)-1 in that order."""
    keep = np.isin(split.labels, classes)
    relabel = np.full(max(classes) + 1, -1)
    relabel[list(classes)] = np.arange(len(classes))
    labels = relabel[split.labels[keep]].astype(np.int64)
    return ImageSet(split.images[keep], labels, tuple(f"{names[i]}_{n:05d}.png" for n, i in enumerate(labels)))


def build_transfer_task(data: Path, out: Path, pretrain_epochs: int = 30, seed: int = 0,
                        source: tuple[int, ...] = SOURCE_CLASSES, target: tuple[int, ...] = TARGET_CLASSES) -> TransferTask:
    """Pretrain a resnet18 on `source` classes of `data` (CIFAR-10 layout) and write the `target` classes
    as a dataset of their own; reuses `out` when it already holds the same task."""
    record = out / "task.json"
    settings = {"data": str(Path(data).resolve()), "pretrain_epochs": pretrain_epochs, "seed": seed,
                "source": list(source), "target": list(target)}
    if record.exists() and json.loads(record.read_text())["settings"] == settings:
        saved = json.loads(record.read_text())
        return TransferTask(Path(saved["target_data"]), Path(saved["weights"]), saved["source_test_accuracy"],
                            tuple(saved["classes"]))
    dataset = open_dataset(data, "cifar10")
    train, test = dataset.splits["train"], dataset.splits["test"]
    target_names = tuple(dataset.classes[i] for i in target)
    write_cifar10(out / "target", subset(train, target, target_names), subset(test, target, target_names), target_names)
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=len(source))
    src_names = tuple(dataset.classes[i] for i in source)
    src_train, src_test = (tensors(subset(split, source, src_names)) for split in (train, test))
    plain_train(model, *src_train, PlainSettings(epochs=pretrain_epochs, seed=seed))
    source_acc = accuracy(model, *src_test)
    weights = out / "source-resnet18.pt"
    torch.save(model.state_dict(), weights)
    task = TransferTask(out / "target", weights, round(source_acc, 4), target_names)
    record.write_text(json.dumps({"settings": settings, **{k: str(v) if isinstance(v, Path) else v
                                                           for k, v in asdict(task).items()}}, indent=2))
    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 layout directory")
    parser.add_argument("--out", type=Path, default=Path("data/transfer"))
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    task = build_transfer_task(args.data, args.out, args.pretrain_epochs, args.seed)
    print(f"{task} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
