"""One short run of fastfeat's CUDA paths, for a machine with a GPU (DALI need not be installed).

Checks and measures, on the CIFAR-10 sample at 224 px with the torch loader:
- cache features under fp32, bf16 and fp16 autocast agree (per-image cosine >= 0.999), images/s each;
- the batched augmentation alone (no model) against fine-tuning with --amp (bf16, and fp16 with its
  gradient scaler): the loader must feed the model faster than it trains;
- channels_last on and off.

    python benchmarks/gpu_check.py [--images 2048] [--json benchmarks/results/gpu_check.json]
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
from fastfeat.transforms import Augment, Preprocess

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-sample"


def cache_run(data: Path, tmp: Path, n: int, **kw) -> tuple[float, torch.Tensor]:
    out = tmp / "c.h5"
    build_cache(CacheOptions(data=str(data), splits=("train",), limit=n // 4, out=str(out), overwrite=True,
                             progress=False, loader="torch", weights="none", device="cuda", **kw))  # warm-up
    result = build_cache(CacheOptions(data=str(data), splits=("train",), limit=n, out=str(out), overwrite=True,
                                      progress=False, loader="torch", weights="none", device="cuda", dtype="float32", **kw))
    return result.images_per_second, torch.from_numpy(read_cache(out, ("train",)).features["train"])


def augment_images_per_second(data: Path, n: int, batch_size: int) -> float:
    split = open_dataset(data, "cifar10", ("train",), n).splits["train"]
    device = torch.device("cuda")
    order = np.arange(len(split))
    for _ in train_batches(split, "torch", Preprocess(), Augment(), batch_size, device, order[:batch_size], 0):
        pass
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in train_batches(split, "torch", Preprocess(), Augment(), batch_size, device, order, 1):
        pass
    torch.cuda.synchronize()
    return len(order) / (time.perf_counter() - start)


def finetune_images_per_second(data: Path, n: int, tmp: Path, batch_size: int, **kw) -> float:
    with tempfile.TemporaryDirectory(dir=tmp) as ckpt:
        result = finetune(FinetuneOptions(data=str(data), dataset="cifar10", limit=n, weights="none", device="cuda",
                                          loader="torch", batch_size=batch_size, epochs=2, checkpoint_dir=ckpt,
                                          progress=False, **kw), log=print)
    return result.history[-1]["train_images_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SAMPLE)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = p.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "images": args.images}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32_ips, fp32 = cache_run(args.data, tmp, args.images, amp=False, batch_size=args.batch_size)
        report["cache"] = {"fp32": fp32_ips}
        for dtype in ("bfloat16", "float16"):
            for channels_last in (True, False):
                ips, feats = cache_run(args.data, tmp, args.images, amp_dtype=dtype, channels_last=channels_last,
                                       batch_size=args.batch_size)
                cos = torch.nn.functional.cosine_similarity(feats, fp32).min().item()
                report["cache"][f"{dtype}{'' if channels_last else ' no-channels-last'}"] = {"images_per_second": ips, "min_cosine_vs_fp32": cos}
                print(f"cache {dtype} channels_last={channels_last}: {ips:.0f} img/s, min cosine vs fp32 {cos:.5f}", flush=True)
        report["augment_only_images_per_second"] = augment_images_per_second(args.data, args.images, args.batch_size)
        print(f"augment only: {report['augment_only_images_per_second']:.0f} img/s", flush=True)
        report["finetune"] = {dtype: finetune_images_per_second(args.data, args.images, tmp, args.batch_size, amp_dtype=dtype)
                              for dtype in ("bfloat16", "float16")}
        report["finetune"]["fp32"] = finetune_images_per_second(args.data, args.images, tmp, args.batch_size, amp=False)
        print("finetune train img/s:", report["finetune"], flush=True)
    write_json(args.json, report)


if __name__ == "__main__":
    main()
