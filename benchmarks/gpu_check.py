"""One short run of fastfeat's CUDA paths, for a machine with a GPU: `fastfeat bench --device cuda` for
cache and finetune (bf16, and fp16 with its gradient scaler), plus the agreement checks.

- `fastfeat bench cache` and `fastfeat bench finetune` (loader only, model only, end to end, bottleneck,
  efficiency); for finetune the loader must outpace the model;
- cache features under bf16 and fp16 autocast, channels_last on and off, agree with fp32 (per-image
  cosine >= 0.999);
- an sgd head and kNN on `--stream-rows` synthetic cached rows, in GPU memory and streamed from the cache
  under a budget 20x smaller (pinned buffers, copies the reader waits for): the same results, and the seconds.
On CIFAR-10 images at 224 px (`--data DIR`, or by default generated CIFAR-like images).

    python benchmarks/gpu_check.py [--images 4096] [--json benchmarks/results/gpu_check.json]

`--device cpu --images 16 --image-size 32 --resize 36` runs the same code on a CPU in a minute: a dry
run that proves the script before GPU time is spent on it (tests/test_benchmarks.py).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from fastfeat.bench import BenchOptions, benchmark
from fastfeat.cache import CacheOptions, build_cache
from fastfeat.cache_file import read_cache
from fastfeat.reporting import write_json
from fastfeat.synthetic import data_or_sample


def cache_features(args: argparse.Namespace, out: Path, **kw) -> torch.Tensor:
    build_cache(CacheOptions(data=str(args.data), splits=("train",), limit=args.images, out=str(out), overwrite=True,
                             progress=False, weights="none", device=args.device, image_size=args.image_size,
                             resize=args.resize, batch_size=args.batch_size, dtype="float32", **kw))
    return torch.from_numpy(read_cache(out, ("train",)).features["train"])


def agreement(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """Min per-image cosine of each reduced-precision variant's features against fp32's."""
    fp32 = cache_features(args, tmp / "fp32.h5", amp=False)
    cosines = {}
    for dtype in ("bfloat16", "float16"):
        for channels_last in (True, False):
            feats = cache_features(args, tmp / "amp.h5", amp_dtype=dtype, channels_last=channels_last)
            name = dtype + ("" if channels_last else " no-channels-last")
            cosines[name] = torch.nn.functional.cosine_similarity(feats, fp32).min().item()
            print(f"cache {name}: min cosine vs fp32 {cosines[name]:.5f}", flush=True)
    return cosines


def streamed(args: argparse.Namespace, tmp: Path) -> dict[str, dict]:
    """Test top1 and seconds of a head (2 epochs) and of kNN, in memory and streamed; the rows written by
    bench_scale.py's synthetic cache."""
    from bench_scale import write_synthetic

    from fastfeat.head import HeadOptions, train_head
    from fastfeat.knn import KnnOptions, knn_evaluate

    cache = write_synthetic(tmp / "rows.h5", args.stream_rows)
    budgets = {"in memory": "64GB", "streamed": f"{max(1, args.stream_rows * 512 * 2 // 20 // 1024)}KB"}
    found = {}
    for name, budget in budgets.items():
        head = train_head(HeadOptions(cache=str(cache), out=str(tmp / "head.pt"), device=args.device, epochs=2,
                                      memory_budget=budget), log=print)
        knn = knn_evaluate(KnnOptions(cache=str(cache), k=(10, 20), device=args.device, memory_budget=budget), log=print)
        found[name] = {"head_top1": head.test["top1"], "head_seconds": head.seconds, "knn_top1": knn.test, "knn_seconds": knn.seconds}
        print(f"{name} ({budget}): {found[name]}", flush=True)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 directory (default: generate images)")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=None, help="default: fastfeat bench's for the device")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--stream-rows", type=int, default=1_000_000, help="synthetic cached rows for the streamed checks")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = p.parse_args()
    report = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        args.data, report["data"] = data_or_sample(args.data, args.images, tmp, test_images=0)
        print(f"data: {report['data']}", flush=True)
        common = dict(data=str(args.data), images=args.images, batch_size=args.batch_size, image_size=args.image_size,
                      resize=args.resize, device=args.device, repeats=1)
        report["bench"] = {}
        for name, what, dtype in (("cache", "cache", None), ("finetune bfloat16", "finetune", "bfloat16"),
                                  ("finetune float16", "finetune", "float16")):
            result = benchmark(BenchOptions(what=what, amp_dtype=dtype, **common), log=print)
            print("\n".join(result.table()), flush=True)
            report["bench"][name] = result.metrics()
        report["agreement"] = agreement(args, Path(tmp))
        report["streamed"] = streamed(args, Path(tmp))
    write_json(args.json, report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
