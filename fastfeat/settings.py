"""Every command's options, as dataclasses: what a user can set, its default and its help, declared once.

The parser (cli.py) and the Python API both build on these, and nothing here imports torch, DALI or h5py at
import time, so `fastfeat --help` is instant; methods that need torch import it where they run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputError
from .options import SEED, Checked, option
from .sources import DATASET_KINDS, SPLITS, SourceInputs
from .spec import FEATURE_DTYPES, INTERPOLATIONS, Preprocess

if TYPE_CHECKING:
    import torch

    from .backbone import Backbone
    from .views import ViewPlan

DEFAULT_ARCH = "resnet18"
LOADERS = ("auto", "dali", "torch")
AMP_DTYPE_NAMES = ("bfloat16", "float16")  # the torch dtypes --amp-dtype can force
AUGMENT_PRESETS = ("recipe", "crop-flip", "rrc-flip")  # transforms.PRESETS makes each
DEFAULT_AUGMENT = "crop-flip"
FLIP = "flip"
TTA_CHOICES = (FLIP,)
VIEW_AUGMENTS = AUGMENT_PRESETS  # the augmentation presets a view can be drawn with
VIEW_POLICIES = ("sample", "center-only")

# what HeadOptions' None lr and weight_decay become (tuned against a tuned L-BFGS probe); L2 = L2_ROWS / rows
DEFAULT_LR = {"sgd": 0.2, "adamw": 3e-3, "lbfgs": 1.0}
SWEEP_LRS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
SWEEP_L2_ROWS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)  # the default weight decays: these / fit rows

SIMILARITY_BYTES = 256 * 2**20  # the largest block of similarities held at once
# the default --memory-budget: shares of what the device has free
HOST_SHARE = 0.5  # of MemAvailable: the rest stays for torch, the page cache and other processes
GPU_SHARE = 0.8  # of the GPU's free memory
BUDGET_HELP = ("memory the features may take, such as 512MB or 8GB; when the data do not fit, they are streamed "
               f"from the cache in blocks (default: {HOST_SHARE * 100:.0f}%% of free RAM on a CPU, "  # %%: argparse's escape
               f"{GPU_SHARE * 100:.0f}%% of free GPU memory)")


@dataclass(frozen=True)
class Augment:
    """A fine-tune augmentation preset and its parameters (each preset reads only its own):

    - `recipe`, the original article's: RandomResizedCrop(resize, scale=first_scale), RandomRotation(degrees),
      ColorJitter(jitter) (its `ColorJitter()` is jitter=0: no change), RandomResizedCrop(image_size, scale),
      RandomHorizontalFlip;
    - `crop-flip`, the standard CIFAR one: the eval geometry (resize, center crop), a random image_size crop of
      it reflect-padded by `pad` px per 32 px of image size (4 px at 32 px, 28 px at 224), horizontal flip;
    - `rrc-flip`, the standard ImageNet one: RandomResizedCrop(image_size, crop_scale, ratio), horizontal flip.

    `jitter` (brightness, contrast, saturation in 1 +- jitter) applies to every preset; then normalize."""

    preset: str = "recipe"
    first_scale: tuple[float, float] = (0.8, 1.0)
    degrees: float = 15.0
    jitter: float = 0.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pad: float = 4.0
    # a short fine-tune wants mild crops: the scales measured on the transfer task are in docs/results.md
    crop_scale: tuple[float, float] = (0.75, 1.0)

    def __post_init__(self) -> None:
        if self.preset not in AUGMENT_PRESETS:
            raise InputError(f"unknown --augment {self.preset!r}: choose {', '.join(AUGMENT_PRESETS)}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise InputError(f"--crop-scale must be two numbers LOW,HIGH with 0 < LOW <= HIGH <= 1, got "
                             f"{','.join(f'{v:g}' for v in self.crop_scale)}")
        if not 0 <= self.pad < 32:
            raise InputError(f"--pad must be at least 0 and below 32 (px at 32 px), got {self.pad:g}")

    def pad_pixels(self, size: int) -> int:
        """`pad` scaled from 32 px to `size`, short of the size itself (reflection needs a row to mirror)."""
        return min(round(self.pad * size / 32), size - 1)


@dataclass
class DataOptions(Checked):
    data: str = option("data", "dataset directory: cifar-10-batches-py/, cifar-100-python/, train/ and test/ "
                               "(or val/) class folders, train.csv and test.csv file lists, train/*.tar and "
                               "test/*.tar shards; or a shard pattern (DIR/train-{000000..000099}.tar, globs)",
                       group="data")
    dataset: str = option("auto", "dataset layout (auto: whichever --data holds; cifar100: its 100 fine labels; "
                                  "list: path,label rows; mnist, dtd, ...: torchvision's layouts; hf: a Hugging Face "
                                  "save_to_disk or parquet directory; hf:NAME[:CONFIG]: a Hugging Face hub dataset, "
                                  "cached in --data; see docs/sources.md)",
                          choices=DATASET_KINDS, group="data")
    download: bool = option(False, "download the --dataset (auto: CIFAR-10) into --data first, with torchvision",
                            group="data")
    limit: int | None = option(None, "at most N images per split: a class-balanced subset drawn with --seed, "
                                     "kept in dataset order", group="data", min=1)
    loader: str = option("auto", "decode and resize pipeline (auto: dali when installed, else torch)",
                         choices=LOADERS, group="data")
    image_column: str | None = option(None, "a Hugging Face dataset's image column (default: its first Image one)",
                                      group="data")
    label_column: str | None = option(None, "a Hugging Face dataset's label column (default: its first ClassLabel one)",
                                      group="data")
    # webdataset shards: one pattern per split, and where the label is
    train_data: str | None = option(None, "the train split's shard pattern (webdataset)", group="data")
    test_data: str | None = option(None, "the test split's shard pattern (webdataset)", group="data")
    label_key: str = option(SourceInputs.label_key, "webdataset: the member (.cls) or json field holding the label",
                            group="data")

    def source_inputs(self) -> SourceInputs:
        given = (("train", self.train_data), ("test", self.test_data))
        return SourceInputs(tuple((split, data) for split, data in given if data), self.label_key,
                            (self.image_column, self.label_column))


@dataclass
class BackboneOptions(Checked):
    arch: str = option(DEFAULT_ARCH, "a torchvision classification model (see `fastfeat models`) or timm:NAME",
                       group="backbone")
    weights: str = option("DEFAULT", "DEFAULT (the arch's best ImageNet weights; `imagenet` is the same), a weights "
                                     "name such as IMAGENET1K_V2, none (random from --seed) or FILE (a state dict)",
                          group="backbone")
    resize: int | None = option(None, "shorter side before the center crop (default: the weights' own)",
                                group="backbone", min=1)
    image_size: int | None = option(None, "center-crop size (default: the weights' own)", group="backbone", min=1)
    interpolation: str | None = option(None, "resize filter (default: the weights' own)", choices=INTERPOLATIONS,
                                       group="backbone")
    seed: int = option(0, "random init for --weights none; the --limit subset; shuffles and augmentation",
                       group="backbone", **SEED)

    def preprocess(self) -> Preprocess:
        """The weights' own preprocessing with the --resize, --image-size and --interpolation given."""
        from .backbone import preprocess_for

        return preprocess_for(self.arch, self.weights, self.resize, self.image_size, self.interpolation)

    def build(self) -> Backbone:
        from .backbone import build_backbone

        return build_backbone(self.arch, self.weights, self.seed, self.preprocess())


@dataclass
class RunOptions(Checked):
    device: str = option("auto", "auto, cpu, cuda or cuda:N", group="device and precision")
    batch_size: int = option(128, "images per batch (per rank under torchrun)", group="device and precision", min=1)
    amp: bool = option(True, "mixed precision: the fastest this device runs natively (bf16 on CUDA GPUs with bf16 "
                             "and on CPUs with native bf16 kernels, fp16 on older GPUs; fp32 where none)",
                       group="device and precision")
    amp_dtype: str | None = option(None, "force the autocast dtype, even where it is emulated (slow)",
                                   choices=AMP_DTYPE_NAMES, group="device and precision")
    channels_last: bool = option(True, "channels_last memory format", group="device and precision")
    compile: bool | str = option("auto", "torch.compile the model (inductor; BatchNorm folded when frozen); auto: "
                                         "when the run has enough images to pay back the compile time",
                                 group="device and precision")
    progress: bool = option(True, "progress bars (plain lines when stderr is not a terminal)",
                            group="device and precision")


CACHE_BATCH_SIZES = {"cpu": 128, "cuda": 1024}  # --batch-size by device: a CPU's, and one that fills a large GPU


@dataclass
class CacheOptions(RunOptions, BackboneOptions, DataOptions):
    batch_size: int | None = option(None, "images per batch, per rank under torchrun (default: " + ", ".join(
        f"{size} on {device}" for device, size in CACHE_BATCH_SIZES.items()) + ")", group="device and precision", min=1)
    splits: tuple[str, ...] | None = option(None, "comma-separated splits to cache (default: train and test, and val "
                                                  "for an image folder with its own val/ beside test/)", group="data")
    out: str | None = option(None, "cache file (default: data/<dataset>-<arch>.h5)", group="output")
    dtype: str = option("float16", "stored feature dtype", choices=FEATURE_DTYPES, group="output")
    resume: bool = option(False, "continue an interrupted run", group="output")
    overwrite: bool = option(False, "replace an existing cache", group="output")
    tta: str | None = option(None, "also cache the features of every split's horizontally flipped center crop "
                                   "(flipped on the device: one more backbone pass, no second decode)",
                             choices=TTA_CHOICES, group="views")
    views: int = option(0, "N augmented views per train image from the same decode (each one more backbone "
                           "pass over train)", group="views", min=0)
    view_augment: str = option(DEFAULT_AUGMENT, "the augmentation of --views (fastfeat finetune's --augment presets)",
                               choices=VIEW_AUGMENTS, group="views")
    view_seed: int = option(0, "the random draws of --views (per batch: reproducible with the same --batch-size)",
                            group="views", **SEED)

    def view_plan(self) -> ViewPlan:
        from .views import ViewPlan

        return ViewPlan(self.tta is not None, self.views, self.view_augment, self.view_seed)

    def batch(self, device: torch.device) -> int:
        return self.batch_size or CACHE_BATCH_SIZES.get(device.type, CACHE_BATCH_SIZES["cpu"])


@dataclass
class HeadOptions(Checked):
    """Defaults: 20 epochs of nesterov SGD, batch 1024, lr 0.2 with cosine decay, L2 100 / train rows on
    standardised features. `lr` and `weight_decay` left None take the optimizer's defaults."""

    cache: str = option(f"data/cifar10-{DEFAULT_ARCH}.h5", "a fastfeat cache")
    out: str | None = option(None, "head file (default: <cache stem>.head.pt beside the cache)")
    epochs: int = option(20, "passes over the train split", min=1)
    batch_size: int = option(1024, "rows per step (sgd, adamw)", min=1)
    lr: float | None = option(None, "learning rate (default: 0.2 sgd, 3e-3 adamw, 1.0 lbfgs)", above=0)
    optimizer: str = option("sgd", "nesterov SGD with cosine decay, AdamW, or full-batch L-BFGS",
                            choices=tuple(DEFAULT_LR))
    weight_decay: float | None = option(None, "L2 on the weight (default: 100 / train rows for sgd and lbfgs; "
                                              "0.5 decoupled for adamw)", min=0)
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", min=0, below=1)
    standardize: bool = option(True, "standardise features with the train split's mean and std")
    val_fraction: float = option(0.1, "share of train held out (class-stratified, drawn with --seed) to validate on every "
                                      "epoch; test is evaluated once, at the end. 0: validate on test every epoch "
                                      "(the recipe's protocol: any choice made from it is made on test). A cache with its own val "
                                      "split (a folder's val/ beside test/) validates on that instead", min=0, below=1)
    seed: int = option(0, "shuffles and the validation split", **SEED)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    sweep: bool = option(False, "train a grid of sgd heads (--lrs x --weight-decays) at once as one batched program, "
                                "pick the best by validation accuracy (ties: the larger weight decay), then refit it")
    lrs: tuple[float, ...] | None = option(None, "--sweep learning rates, comma-separated (default: "
                                                 + ",".join(f"{v:g}" for v in SWEEP_LRS) + ")", above=0)
    weight_decays: tuple[float, ...] | None = option(None, "--sweep L2 strengths, comma-separated (default: "
                                                           + ",".join(f"{v:g}" for v in SWEEP_L2_ROWS) + " / fit rows)", min=0)
    refit: bool = option(True, "--sweep: retrain the chosen setting on train + validation (the single-head path) "
                               "before the one test evaluation; --no-refit keeps the sweep's own head")
    views_policy: str = option("sample", "sample: each epoch, one view per train row, drawn from its center crop and "
                                         "the views the cache holds (fastfeat cache --views, --tta); center-only: "
                                         "the center crops alone", choices=VIEW_POLICIES)
    tta: bool | None = option(None, "evaluate on the mean of the center and flipped crops' probabilities "
                                    "(default: when the cache holds flips)")
    predictions: str | None = option(None, "a CSV of every test row: row, file (folders), true and predicted class, "
                                           "probability", group="output")
    plot: str | None = option(None, "write learning_curves.png, confusion.png (test) and, with --sweep, sweep.png "
                                    "into this folder (needs the plot extra: matplotlib)", group="output")
    memory_budget: int | str | None = option(None, BUDGET_HELP, size=True)  # bytes once made


@dataclass
class KnnOptions(Checked):
    """Defaults: DINO's k = 10, 20, 100, 200 and temperature 0.07; 10 % of train held out for validation."""

    cache: str = option(f"data/cifar10-{DEFAULT_ARCH}.h5", "a fastfeat cache")
    k: tuple[int, ...] = option((10, 20, 100, 200), "neighbour counts, a comma list such as 10,20,100,200", min=1)
    temperature: float = option(0.07, "the votes' temperature T: a neighbour's weight is exp(similarity / T)", above=0)
    val_fraction: float = option(0.1, "fraction of every class of train held out as validation (0: none)", min=0, below=1)
    seed: int = option(0, "the validation draw", **SEED)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    batch_size: int | None = option(None, "queries per block (default: as many as keep a block of similarities "
                                          f"within {SIMILARITY_BYTES // 2**20} MiB)", min=1)
    tta: bool | None = option(None, "classify each query by the mean of its center and flipped crops' vote shares "
                                    "(default: when the cache holds flips, fastfeat cache --tta flip)")
    memory_budget: int | str | None = option(None, BUDGET_HELP, size=True)  # bytes once made


SCHEDULES = ("cosine", "step", "none")
FRESH_HEAD_SMOOTHING = 0.1  # --label-smoothing's default from a fresh head


@dataclass
class FinetuneOptions(RunOptions, BackboneOptions, DataOptions):
    batch_size: int = option(256, "images per batch (per rank under torchrun)", group="device and precision", min=1)
    augment: str = option(DEFAULT_AUGMENT, "augmentation preset: the original recipe's (RandomResizedCrop 256 + "
                                       "rotation + RandomResizedCrop + flip), crop-flip (random crop of the reflect-"
                                       "padded image + flip, no resampling) or rrc-flip (RandomResizedCrop + flip)",
                          choices=AUGMENT_PRESETS, group="training")
    pad: float = option(Augment.pad, "crop-flip: padding in px at 32 px, scaled with --image-size (28 px at 224)",
                        group="training", min=0, below=32)
    crop_scale: tuple[float, ...] = option(Augment.crop_scale, "rrc-flip: LOW,HIGH share of the image area a crop covers",
                                           group="training")
    jitter: float = option(Augment.jitter, "ColorJitter strength (the recipe's ColorJitter() is 0: no change)", group="training", min=0)
    epochs: int = option(5, "passes over the train split", group="training", min=1)
    lr: float = option(0.05, "the head's learning rate", group="training", above=0)
    backbone_lr_scale: float = option(1.0, "backbone lr = lr x this", group="training", min=0)
    optimizer: str = option("sgd", "nesterov SGD or AdamW", choices=("sgd", "adamw"), group="training")
    schedule: str = option("cosine", "per-step decay after the warm-up", choices=SCHEDULES, group="training")
    warmup_epochs: float = option(1.0, "linear lr warm-up (with --init-head: head-only epochs, then the backbone's ramp)",
                                  group="training", min=0)
    weight_decay: float = option(5e-4, "L2 weight decay", group="training", min=0)
    label_smoothing: float | None = option(None, f"cross-entropy label smoothing (default {FRESH_HEAD_SMOOTHING:g}; from "
                                                 "--init-head, the smoothing that head was fit with, 0 by default)",
                                           group="training", min=0, below=1)
    freeze: str = option("none", "what stays frozen: a named stage (resnet: stem, layer1..layer3), a fraction of the "
                                 "backbone (0.5), or module names; `--freeze help` lists an arch's", group="training")
    init_head: str | None = option(None, "start from a head made by train-head on the same features (the warm-up "
                                         "is then head-only: the backbone holds still, then its lr ramps up)",
                                   group="training")
    recompute_bn: int = option(1024, "before each validation, BatchNorm's running statistics are recomputed from this "
                                     "many train images (a seeded sample, eval preprocessing) under the epoch's final "
                                     "weights, so validation, test and checkpoints use statistics of the weights they "
                                     "evaluate, not a lagging average; 0: keep the running averages", group="training", min=0)
    val_fraction: float = option(0.1, "share of train held out (class-stratified, drawn with --seed) to validate on every "
                                      "epoch and choose best.pt; test is evaluated once, at the end, with last and best. "
                                      "0: validate on test every epoch (the recipe's protocol)", group="training", min=0, below=1)
    checkpoint_dir: str = option("data/finetune", "where last.pt and best.pt go", group="training")
    predictions: str | None = option(None, "a CSV of every test image as the last model classifies it: row, file "
                                           "(folders), true and predicted class, probability", group="output")
    plot: str | None = option(None, "write learning_curves.png and confusion.png (test, last model) into this folder "
                                    "(needs the plot extra: matplotlib)", group="output")
    resume: bool = option(False, "continue from CHECKPOINT_DIR/last.pt", group="training")


BENCHES = ("cache", "finetune")
# default batch sizes: a CPU's, and one that fills a large GPU
BENCH_BATCH_SIZES = {**{("cache", device): size for device, size in CACHE_BATCH_SIZES.items()},
               ("finetune", "cpu"): 64, ("finetune", "cuda"): 256}


@dataclass
class BenchOptions(RunOptions, BackboneOptions):
    what: str = option("cache", "the command to benchmark", choices=BENCHES, group="bench", positional=True)
    data: str | None = option(None, "dataset directory (default: generated CIFAR-like images)", group="data")
    dataset: str = option("auto", "dataset layout; folder benches the JPEG decode path (generated data: a JPEG folder), "
                                  "webdataset the same JPEGs read from tar shards",
                          choices=DATASET_KINDS, group="data")
    loader: str = option("auto", "decode and resize pipeline (auto: dali when installed, else torch)",
                         choices=LOADERS, group="data")
    images: int = option(1024, "images per timed stage", group="data", min=10)
    weights: str = option("none", "none (random from --seed: nothing to download), DEFAULT, a weights name or FILE",
                          group="backbone")
    batch_size: int | None = option(None, "images per batch (default: " + ", ".join(
        f"{size} {what} on {device}" for (what, device), size in BENCH_BATCH_SIZES.items()) + ")", group="device and precision", min=1)
    jitter: float = option(FinetuneOptions.jitter, "finetune: ColorJitter strength", group="bench", min=0)
    augment: str = option(FinetuneOptions.augment, "finetune: the augmentation preset (fastfeat finetune's default)",
                          choices=AUGMENT_PRESETS, group="bench")
    repeats: int = option(2, "timed runs of each stage, interleaved; the best counts", group="bench", min=1)
    vs_original: bool = option(False, "also time the original recipe's pipeline (PIL + DataLoader + fp32)",
                               group="bench")
    json: str | None = option(None, "also write every number, the settings and machine info to this JSON file",
                              group="bench")
    progress: bool = False  # the timed loops print nothing

    def batch(self, device: torch.device) -> int:
        return self.batch_size or BENCH_BATCH_SIZES[self.what, device.type]


@dataclass
class MetricsOptions(Checked):
    metrics: str | None = option(None, "also write the results to this JSON file", group="output")


@dataclass
class PredictOptions(Checked):
    images: tuple[str, ...] | None = option(None, "image files", positional=True)
    model: str | None = option(None, "finetune checkpoint (last.pt/best.pt) or head file", required=True)
    data: str | None = option(None, "report accuracy on this dataset's --split instead")
    split: str = option("test", "the split --data reports on", choices=SPLITS)
    limit: int | None = option(None, "a class-balanced subset of N images of the split", min=1)
    loader: str = option("auto", "decode and resize pipeline", choices=LOADERS)
    weights: str | None = option(None, "the backbone FILE of a head whose features came from a file")
    topk: int = option(3, "classes shown per image", min=1)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    batch_size: int = option(128, "images per batch", min=1)
    amp: bool = option(True, "mixed precision")
    tta: bool = option(False, "test-time flip: average the probabilities of each center crop and its mirror")
    predictions: str | None = option(None, "with --data: a CSV of every image's true and predicted class")


@dataclass
class InfoOptions(Checked):
    file: str = option(None, "a cache (.h5, complete or .partial), a head or a finetune checkpoint", positional=True)
    json: bool = option(False, "print JSON")


@dataclass
class ModelsOptions(Checked):
    json: bool = option(False, "print JSON instead of a table")


PROBES = ("head", "sweep", "knn", "finetune")  # finetune runs the backbone again: opt-in, full shots only
SUITE_PROBES = ("head", "sweep", "knn")
SUITE_OUT = "suite"
SUITE_DATA_ROOT = "data"
FULL = "full"  # --shots: the whole train split


@dataclass
class SuiteOptions(Checked):
    """The suite's flags. Every value left None is taken from --config, else its default, so a flag given
    on the command line wins over the file."""

    archs: tuple[str, ...] | None = option(None, "backbones, comma-separated (see `fastfeat models`; timm:NAME too)",
                                           group="suite")
    datasets: tuple[str, ...] | None = option(None, "datasets, comma-separated: --dataset names read from --data-root "
                                                    "(cifar10, pets, ...) or NAME=PATH (a folder or other local data)",
                                              group="suite")
    data_root: str | None = option(None, f"the folder holding the named datasets (default: {SUITE_DATA_ROOT})",
                                   group="suite")
    probes: tuple[str, ...] | None = option(None, "what runs on each cache, comma-separated (default: "
                                                  f"{','.join(SUITE_PROBES)}; finetune is opt-in and runs at full shots only)",
                                            choices=PROBES, group="suite")
    shots: tuple[str, ...] | None = option(None, f"train rows per class, comma-separated: {FULL} (the whole train split) "
                                                 f"or K, drawn class-balanced with each trial's seed (default: {FULL})",
                                           group="suite")
    trials: int | None = option(None, "trials of every shots setting: trial t draws its shots, validation rows and "
                                      "shuffles with seed t (default: 1)", group="suite", min=1)
    val_shots: int | None = option(None, "K-shot trials: validation rows per class, drawn from the train rows outside "
                                         "the K shots, never from test (default: K)", group="suite", min=1)
    out: str | None = option(None, f"the suite's folder: caches/, results.csv, summary.md, suite.toml (default: "
                                   f"{SUITE_OUT})", group="suite")
    config: str | None = option(None, "a TOML file holding these keys, a [cache] table (fastfeat cache's options) and "
                                      "[probes.NAME] tables (each probe's options, such as [probes.sweep] lrs)",
                                group="suite")
    dry_run: bool = option(False, "print the plan (cells, caches to compute or reuse, backbone images) and stop",
                           group="suite")
    weights: str | None = option(None, "every backbone's weights: DEFAULT, none (random from seed 0) or FILE "
                                       "(default: DEFAULT)", group="cache")
    resize: int | None = option(None, "shorter side before the center crop (default: each weights' own)", group="cache",
                                min=1)
    image_size: int | None = option(None, "center-crop size (default: each weights' own)", group="cache", min=1)
    loader: str | None = option(None, "decode and resize pipeline (default: auto)", choices=LOADERS, group="cache")
    device: str | None = option(None, "auto, cpu, cuda or cuda:N, for the caches and every probe (default: auto)",
                                group="cache")
    limit: int | None = option(None, "at most N images per split of every dataset, class-balanced", group="cache", min=1)
    progress: bool = option(True, "a progress bar over the cells (and the caches' own)", group="suite")
