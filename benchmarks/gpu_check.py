"""One short run of fastfeat's CUDA paths, for a machine with a GPU (DALI need not be installed).

Checks and measures, on CIFAR-10 images at 224 px with the torch loader (`--data DIR`, or by default
generated CIFAR-like images, see fastfeat.synthetic):
- cache features under fp32, bf16 and fp16 autocast agree (per-image cosine >= 0.999), images/s each;
- the batched augmentation alone (no model) against fine-tuning with --amp (bf16, and fp16 with its
  gradient scaler): the loader must feed the model faster than it trains;
- channels_last on and off.

    python benchmarks/gpu_check.py [--images 2048] [--json benchmarks/results/gpu_check.json]

`--device cpu --images 64 --image-size 64 --resize 73` runs the same code on a CPU in a minute: a dry
run that proves the script before GPU time is spent on it.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastfeat.cache import CacheOptions, build_cache
from fastfeat.cache_file import read_cache
from fastfeat.finetune import FinetuneOptions, finetune
from fastfeat.loaders import train_batches
from fastfeat.reporting import write_json
from fastfeat.sources import open_dataset
from fastfeat.synthetic import data_or_sample
from fastfeat.transforms import Augment, Preprocess


def cache_run(args: argparse.Namespace, tmp: Path, **kw) -> tuple[float, torch.Tensor]:
    out = tmp / "c.h5"
    common = dict(data=str(args.data), splits=("train",), out=str(out), overwrite=True, progress=False, loader="torch",
                  weights="none", device=args.device, image_size=args.image_size, resize=args.resize,
                  batch_size=args.batch_size, **kw)
    build_cache(CacheOptions(limit=max(10, args.images // 4), **common))  # warm-up (a subset holds all 10 classes)
    result = build_cache(CacheOptions(limit=args.images, dtype="float32", **common))
    return result.images_per_second, torch.from_numpy(read_cache(out, ("train",)).features["train"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def augment_images_per_second(args: argparse.Namespace) -> float:
    split = open_dataset(args.data, "cifar10", ("train",), args.images).splits["train"]
    device, pre = torch.device(args.device), Preprocess(resize=args.resize, image_size=args.image_size)
    order = np.arange(len(split))
    for _ in train_batches(split, "torch", pre, Augment(), args.batch_size, device, order[: args.batch_size], 0):
        pass
    synchronize(device)
    start = time.perf_counter()
    for _ in train_batches(split, "torch", pre, Augment(), args.batch_size, device, order, 1):
        pass
    synchronize(device)
    return len(order) / (time.perf_counter() - start)


def finetune_images_per_second(args: argparse.Namespace, tmp: Path, **kw) -> float:
    with tempfile.TemporaryDirectory(dir=tmp) as ckpt:
        result = finetune(FinetuneOptions(
            data=str(args.data), dataset="cifar10", limit=args.images, weights="none", device=args.device,
            image_size=args.image_size, resize=args.resize, loader="torch", batch_size=args.batch_size, epochs=2,
            checkpoint_dir=ckpt, progress=False, **kw), log=print)
    return result.history[-1]["train_images_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 directory (default: generate images)")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "images": args.images, "image_size": args.image_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args.data, report["data"] = data_or_sample(args.data, args.images, tmp)
        print(f"data: {report['data']}", flush=True)
        fp32_ips, fp32 = cache_run(args, tmp, amp=False)
        report["cache"] = {"fp32": {"images_per_second": fp32_ips}}
        for dtype in ("bfloat16", "float16"):
            for channels_last in (True, False):
                ips, feats = cache_run(args, tmp, amp_dtype=dtype, channels_last=channels_last)
                cos = torch.nn.functional.cosine_similarity(feats, fp32).min().item()
                name = dtype + ("" if channels_last else " no-channels-last")
                report["cache"][name] = {"images_per_second": ips, "min_cosine_vs_fp32": cos}
                print(f"cache {name}: {ips:.0f} img/s, min cosine vs fp32 {cos:.5f}", flush=True)
        report["augment_only_images_per_second"] = augment_images_per_second(args)
        print(f"augment only: {report['augment_only_images_per_second']:.0f} img/s", flush=True)
        report["finetune"] = {dtype: finetune_images_per_second(args, tmp, amp_dtype=dtype)
                              for dtype in ("bfloat16", "float16")}
        report["finetune"]["fp32"] = finetune_images_per_second(args, tmp, amp=False)
        print("finetune train img/s:", report["finetune"], flush=True)
    write_json(args.json, report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
