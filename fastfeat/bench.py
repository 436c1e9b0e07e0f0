"""`fastfeat bench cache|finetune`: where the time goes, and which stage bounds the run.

On the same images, batch size and precision, it times
- loader only: decode + resize/crop (+ augmentation) + normalize, batches delivered on the device;
- model only: the forward (cache) or the whole training step (finetune) on a batch already there;
- end to end: the real command path (`build_cache` with its HDF5 writes into a temporary file; the
  fine-tune epoch loop with the real loader);
- with `--vs-original`, the original recipe's pipeline (PIL transforms + DataLoader + fp32).
Startup (model build, first passes: DALI pipeline build, oneDNN primitives, compile) is run first and
reported apart. Each stage runs `--repeats` times, interleaved with the others; the best run counts.
With no `--data` it generates CIFAR-like images (in CIFAR's python layout, as a JPEG folder for
`--dataset folder`, and as WebDataset shards of that folder for `--dataset webdataset`), so it runs anywhere.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from .backbone import FeatureExtractor, build_backbone
from .cache import build_cache
from .finetune import Trainer, augmentation, epoch_order, train_epoch
from .loaders import (
    dali_available,
    eval_batches,
    resolve_loader,
    train_batches,
)
from .runtime import (
    cpu_bf16_native,
    cpu_capability,
    choose_precision,
    compile_wanted,
    cuda_bf16_supported,
    host_arrays,
    image_device,
    keep_freed_memory,
    loader_workers,
    precision_name,
    synchronize,
)
from .settings import BenchOptions, CacheOptions, FinetuneOptions
from .sources import Dataset, Split, open_dataset
from .synthetic import data_or_sample, write_shards
from .spec import IMAGENET_MEAN, IMAGENET_STD, Preprocess

ORIGINAL_BATCH = {"cache": 64, "finetune": 16}  # the recipe's DataLoader batch sizes
ORIGINAL_WORKERS = 2
STAGE_NAMES = {"loader": "loader only", "model": "model only", "end_to_end": "end to end", "original": "original recipe"}
SHARD_SAMPLES = 256  # samples per generated WebDataset shard
OTHER_MODEL = "model "  # + a precision name: the bare model at a precision other than the run's


def stage_name(stage: str) -> str:
    return STAGE_NAMES.get(stage, stage.replace("_", " "))


def native_dtypes(device: torch.device) -> list[torch.dtype | None]:
    """The precisions this device runs natively, the candidates for "the fastest bare model"."""
    bf16 = cuda_bf16_supported() if device.type == "cuda" else cpu_bf16_native()
    return [None, torch.bfloat16] if bf16 else [None]


@dataclass
class BenchResult:
    what: str
    settings: dict
    runs: dict[str, list[float]]  # stage -> images/s of each run
    startup: dict[str, float]
    machine: dict = field(default_factory=dict)

    def best(self, stage: str) -> float:
        return max(self.runs[stage])

    @property
    def fastest_model(self) -> str:
        """The bare model's stage at the fastest precision measured (the run's own, or another native one)."""
        return max((stage for stage in self.runs if stage == "model" or stage.startswith(OTHER_MODEL)), key=self.best)

    @property
    def fastest_precision(self) -> str:
        fastest = self.fastest_model
        return self.settings["precision"] if fastest == "model" else fastest.removeprefix(OTHER_MODEL)

    def vs_fastest(self, stage: str) -> float:
        """`stage` against the fastest bare model: what the run keeps of what this device can do."""
        return self.best(stage) / self.best(self.fastest_model)

    @property
    def bottleneck(self) -> str:
        return "loader" if self.best("loader") < self.best("model") else "model"

    @property
    def efficiency(self) -> float:
        """End to end against the slower stage alone: 1.0 = the loop adds nothing to its bottleneck."""
        return self.best("end_to_end") / min(self.best("loader"), self.best("model"))

    def table(self) -> list[str]:
        s = self.settings
        lines = [f"fastfeat bench {self.what}: {s['arch']} ({s['weights']}), {s['image_size']} px, batch {s['batch_size']}, "
                 f"{s['precision']}, loader {s['loader']}, {s['device']}; {s['images']} images of {s['data']}",
                 f"{'stage':<16} {'images/s':>9}  runs"]
        for stage, runs in self.runs.items():
            lines.append(f"{stage_name(stage):<16} {max(runs):>9.1f}  {', '.join(f'{r:.1f}' for r in runs)}")
        startup = ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in self.startup.items())
        lines.append(f"bottleneck: {self.bottleneck}; efficiency {self.efficiency:.3f} (end to end / slower stage); "
                     f"startup {sum(self.startup.values()):.2f} s ({startup}, not timed)")
        against = [f"{stage_name(stage)} {self.vs_fastest(stage):.3f}" for stage in ("end_to_end", "original") if stage in self.runs]
        lines.append(f"against the fastest bare model ({self.fastest_precision}): {', '.join(against)}; "
                     f"precision {s['precision']}: {s['precision_reason']}")
        return lines

    def metrics(self) -> dict:
        extra = {"original_images_per_second": round(self.best("original"), 2),
                 "original_vs_fastest_model": round(self.vs_fastest("original"), 4)} if "original" in self.runs else {}
        return {
            "command": f"bench {self.what}",
            "loader_images_per_second": round(self.best("loader"), 2),
            "model_images_per_second": round(self.best("model"), 2),
            "end_to_end_images_per_second": round(self.best("end_to_end"), 2),
            "fastest_model_precision": self.fastest_precision,
            "fastest_model_images_per_second": round(self.best(self.fastest_model), 2),
            "end_to_end_vs_fastest_model": round(self.vs_fastest("end_to_end"), 4),
            **extra,
            "precision": self.settings["precision"],
            "precision_reason": self.settings["precision_reason"],
            "bottleneck": self.bottleneck,
            "efficiency": round(self.efficiency, 4),
            "startup_seconds": round(sum(self.startup.values()), 3),
            "startup": {k: round(v, 3) for k, v in self.startup.items()},
            "runs": {k: [round(r, 2) for r in v] for k, v in self.runs.items()},
            "settings": self.settings,
            "machine": self.machine,
        }


def machine_info(device: torch.device) -> dict:
    """What the numbers depend on: CPU model and cores, GPU, library versions."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    dali = None
    if dali_available():
        import nvidia.dali

        dali = nvidia.dali.__version__
    return {
        "cpu_model": names[0] if names else platform.processor(),
        "cpu_cores": os.cpu_count(),
        "cpu_capability": cpu_capability(),
        "bf16_native": cpu_bf16_native() if device.type == "cpu" else cuda_bf16_supported(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": dali,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def timed(device: torch.device, run: Callable[[], int]) -> float:
    """Images/s of `run` (which returns the images it processed), device work included."""
    synchronize(device)
    start = time.perf_counter()
    images = run()
    synchronize(device)
    return images / (time.perf_counter() - start)


def batch_sizes(images: int, batch_size: int) -> list[int]:
    return [min(batch_size, images - start) for start in range(0, images, batch_size)]


# ---- the original recipe ---------------------------------------------------------------------------------


class RecipeImages(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 (or ImageFolder) does per item: a PIL image through the transform, label."""

    def __init__(self, split: Split, transform: Callable):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.split.images is not None:
            image = Image.fromarray(self.split.images[index])
        else:
            with Image.open(self.split.files[index]) as file:
                image = file.convert("RGB")
        return self.transform(image), int(self.split.labels[index])


def recipe_eval_transform(pre: Preprocess):
    from torchvision import transforms as T

    return T.Compose([T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation)),
                      T.CenterCrop(pre.image_size), T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def recipe_train_transform(pre: Preprocess):
    """The recipe's fine-tune augmentation (its sizes scaled to `pre`), ImageNet normalization."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size=pre.resize, scale=(0.8, 1.0)), T.RandomRotation(degrees=15),
                      T.ColorJitter(), T.RandomResizedCrop(pre.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def recipe_batches(split: Split, transform: Callable, batch_size: int, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(RecipeImages(split, transform), batch_size=batch_size, shuffle=shuffle,
                                       num_workers=ORIGINAL_WORKERS)


def steady_images_per_second(batches: Iterable[tuple], step: Callable[[torch.Tensor, torch.Tensor], None]) -> float:
    """Images/s after the first batch (worker start-up and first-step set-up are the recipe's startup);
    over all of them when there is only one."""
    begin, start, images, seen = time.perf_counter(), None, 0, 0
    for inputs, labels in batches:
        step(inputs, labels)
        images += len(labels)
        if start is None:
            start = time.perf_counter()
        else:
            seen += len(labels)
    end = time.perf_counter()
    return seen / (end - start) if seen else images / (end - begin)


# ---- the two benchmarks -----------------------------------------------------------------------------------


class CacheBench:
    """`fastfeat cache`'s stages: the frozen forward; end to end = `build_cache` into a temporary file."""

    def __init__(self, opts: BenchOptions, root: Path, dataset: Dataset, device: torch.device, tmp: Path):
        self.opts, self.root, self.device, self.tmp = opts, root, device, tmp
        self.split, self.classes = dataset.splits["train"], len(dataset.classes)
        self.loader, self.batch_size = resolve_loader(opts.loader), opts.batch(device)
        self.precision = choose_precision(device, opts.amp, opts.amp_dtype)
        self.dtype = self.precision.dtype
        self.backbone = opts.build()
        self.pre = self.backbone.spec.pre
        compile = compile_wanted(opts.compile, len(self.split), device, "forward", self.dtype)
        self.extractor = FeatureExtractor(self.backbone.model, device, self.dtype, opts.channels_last, compile)

    @property
    def compiled(self) -> bool:
        return self.extractor.forward.compiled

    def warm_up(self) -> None:
        """One full and one tail batch through each stage: every shape the timed runs meet."""
        self.first = next(eval_batches(self.split.rows(0, self.batch_size), self.loader, self.pre, self.batch_size, self.device))
        self.model(min(len(self.split), self.batch_size + len(self.split) % self.batch_size))
        self.end_to_end(min(len(self.split), max(self.classes, self.batch_size + len(self.split) % self.batch_size)))

    def loader_only(self) -> int:
        return sum(len(batch) for batch in eval_batches(self.split, self.loader, self.pre, self.batch_size, self.device))

    def model(self, images: int | None = None, extractor: FeatureExtractor | None = None) -> int:
        images, extractor = images or len(self.split), extractor or self.extractor
        features = (extractor(self.first[:n]) for n in batch_sizes(images, self.batch_size))
        for _ in host_arrays(features, self.device):  # the features reach the host, as in `build_cache`
            pass
        return images

    def other_model(self, dtype: torch.dtype | None) -> Callable[[int | None], int]:
        """The bare forward at another precision (eager), warmed up."""
        extractor = FeatureExtractor(self.backbone.model, self.device, dtype, self.opts.channels_last)
        self.model(min(len(self.split), self.batch_size + len(self.split) % self.batch_size), extractor)
        return lambda images=None: self.model(images, extractor)

    def end_to_end(self, images: int | None = None) -> float:
        result = build_cache(CacheOptions(
            data=str(self.root), dataset=self.opts.dataset, splits=("train",), limit=images or self.opts.images,
            loader=self.loader, arch=self.opts.arch, weights=self.opts.weights, resize=self.opts.resize,
            image_size=self.opts.image_size, interpolation=self.opts.interpolation, seed=self.opts.seed,
            device=str(self.device), batch_size=self.batch_size, amp=self.opts.amp, amp_dtype=self.opts.amp_dtype,
            channels_last=self.opts.channels_last, compile=self.opts.compile, out=str(self.tmp / "bench.h5"),
            overwrite=True, progress=False,
        ), self.backbone, self.extractor)
        return result.images_per_second

    def original(self) -> float:
        """PIL Resize + CenterCrop + ToTensor + Normalize, DataLoader(batch 64, 2 workers), fp32 forward."""
        net = build_backbone(self.opts.arch, self.opts.weights, self.opts.seed, self.pre).model.to(self.device)
        batches = recipe_batches(self.split, recipe_eval_transform(self.pre), ORIGINAL_BATCH["cache"], False)
        with torch.no_grad():
            return steady_images_per_second(batches, lambda images, _: net(images.to(self.device)).cpu())


class FinetuneBench:
    """`fastfeat finetune`'s stages: the whole training step (`Trainer.step`); end to end = its epoch loop."""

    def __init__(self, opts: BenchOptions, root: Path, dataset: Dataset, device: torch.device, tmp: Path):
        self.split, self.device, self.batch_size = dataset.splits["train"], device, opts.batch(device)
        self.loader = resolve_loader(opts.loader)
        self.options = FinetuneOptions(
            data=str(root), dataset=opts.dataset, limit=opts.images, loader=self.loader, arch=opts.arch, weights=opts.weights,
            resize=opts.resize, image_size=opts.image_size, interpolation=opts.interpolation, seed=opts.seed,
            device=str(device), batch_size=self.batch_size, amp=opts.amp, amp_dtype=opts.amp_dtype,
            channels_last=opts.channels_last, compile=opts.compile, jitter=opts.jitter, augment=opts.augment,
            checkpoint_dir=str(tmp),
            progress=False,
        )
        self.order = epoch_order(len(self.split), opts.seed, 0, self.batch_size)
        self.classes, self.steps = list(dataset.classes), -(-len(self.order) // self.batch_size)
        self.trainer = Trainer(self.options, self.classes, self.steps, device=device)
        self.pre, self.aug = self.trainer.spec.pre, augmentation(self.options)
        self.precision, self.dtype = self.trainer.precision, self.trainer.dtype

    @property
    def compiled(self) -> bool:
        return self.trainer.forward.compiled

    def batches(self, order: np.ndarray) -> Iterator[torch.Tensor]:
        return train_batches(self.split, self.loader, self.pre, self.aug, self.batch_size, self.device, order, 0)

    def warm_up(self) -> None:
        self.first = next(self.batches(self.order[: self.batch_size]))
        self.labels = torch.from_numpy(self.split.labels[self.order[: len(self.first)]]).to(self.device)
        self.model(min(len(self.order), 2 * self.batch_size))  # the first steps set up; every batch has one size

    def loader_only(self) -> int:
        return sum(len(batch) for batch in self.batches(self.order))

    def model(self, images: int | None = None, trainer: Trainer | None = None) -> int:
        images, trainer = images or len(self.order), trainer or self.trainer
        trainer.train_mode()
        for n in batch_sizes(images, self.batch_size):
            loss, _ = trainer.step(self.first[:n], self.labels[:n])
        loss.item()
        return images

    def other_model(self, dtype: torch.dtype | None) -> Callable[[int | None], int]:
        """The bare training step of a second model at another precision (eager), warmed up."""
        options = replace(self.options, amp=dtype is not None, amp_dtype=dtype and precision_name(dtype), compile=False)
        trainer = Trainer(options, self.classes, self.steps, device=self.device)
        self.model(min(len(self.order), 2 * self.batch_size), trainer)
        return lambda images=None: self.model(images, trainer)

    def end_to_end(self) -> float:
        _, _, images, seconds = train_epoch(self.trainer, self.split, self.loader, self.aug)
        return images / seconds

    def original(self) -> float:
        """The recipe's augmentation in PIL, DataLoader(batch 16, 2 workers), fp32 SGD over the whole network."""
        backbone = build_backbone(self.options.arch, self.options.weights, self.options.seed, self.pre)
        net = backbone.with_head(torch.nn.Linear(backbone.spec.feature_dim, len(self.trainer.classes))).to(self.device)
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, weight_decay=1e-3, momentum=0.9)
        criterion = torch.nn.CrossEntropyLoss()
        net.train()

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            loss = criterion(net(images.to(self.device)), labels.to(self.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        batches = recipe_batches(self.split, recipe_train_transform(self.pre), ORIGINAL_BATCH["finetune"], True)
        return steady_images_per_second(batches, step)


BENCH_CLASSES = {"cache": CacheBench, "finetune": FinetuneBench}


def open_images(opts: BenchOptions, tmp: Path) -> tuple[Path, Dataset, str]:
    """The data root, its train split of `--images` rows, and a line saying which data it is."""
    root, described = data_or_sample(opts.data, opts.images, tmp, test_images=0)
    if opts.data is None and opts.dataset == "folder":
        root, described = root / "folder", described.replace("images", "JPEG images", 1)
    elif opts.data is None and opts.dataset == "webdataset":
        root = write_shards(root / "folder", root / "webdataset", SHARD_SAMPLES)
        described = described.replace("images", f"JPEG images in shards of {SHARD_SAMPLES}", 1)
    return root, open_dataset(root, opts.dataset, ("train",), opts.images, seed=opts.seed), described


def benchmark(opts: BenchOptions, log: Callable[[str], None] = lambda line: None) -> BenchResult:
    """Build once, warm up once, then time each stage `repeats` times, interleaved."""
    device = image_device(opts.device)
    with tempfile.TemporaryDirectory(prefix="fastfeat-bench-") as tmp:
        root, dataset, described = open_images(opts, Path(tmp))
        log(f"data: {described}")
        start = time.perf_counter()
        bench = BENCH_CLASSES[opts.what](opts, root, dataset, device, Path(tmp))
        built = time.perf_counter()
        bench.warm_up()
        others = {OTHER_MODEL + precision_name(dtype): bench.other_model(dtype)
                  for dtype in native_dtypes(device) if dtype != bench.dtype}
        startup = {"model_build": built - start, "warm_up": time.perf_counter() - built}
        stages = {"loader": lambda: timed(device, bench.loader_only), "model": lambda: timed(device, bench.model),
                  **{stage: (lambda m=m: timed(device, m)) for stage, m in others.items()},
                  "end_to_end": bench.end_to_end}
        if opts.vs_original:
            stages["original"] = bench.original
        runs: dict[str, list[float]] = {stage: [] for stage in stages}
        for repeat in range(opts.repeats):
            for stage, measure in stages.items():
                runs[stage].append(measure())
                log(f"  run {repeat + 1}: {stage_name(stage)} {runs[stage][-1]:.1f} images/s")
    settings = {
        "arch": opts.arch, "weights": opts.weights, "image_size": bench.pre.image_size, "resize": bench.pre.resize,
        "interpolation": bench.pre.interpolation, "batch_size": bench.batch_size, "precision": bench.precision.name,
        "precision_reason": bench.precision.reason,
        "loader": bench.loader, "device": str(device), "images": len(bench.split), "data": described,
        "dataset": opts.dataset,
        "channels_last": opts.channels_last, "compile": opts.compile, "compiled": bench.compiled, "repeats": opts.repeats,
        "threads": {"torch": torch.get_num_threads(), "loader": loader_workers()},
        "allocator": keep_freed_memory(),
        **({"original_batch_size": ORIGINAL_BATCH[opts.what], "original_workers": ORIGINAL_WORKERS}
           if opts.vs_original else {}),
    }
    return BenchResult(opts.what, settings, runs, startup, machine_info(device))

