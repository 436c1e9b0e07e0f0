"""`fastfeat finetune`: augmented batches through the whole network with mixed precision.

Unlike the original recipe (whose optimizer held only `fc`), the backbone really is updated:
backbone parameters at lr x backbone_lr_scale, the head at lr. Epochs are validated on a class-stratified
share of train held out with the seed; the test split is evaluated once, at the end, with the last and
the best (by validation) model.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .freezing import frozen_parameters
from .distributed import World, all_reduce_sum, barrier, init_world, is_main_process, shard_range
from .errors import FastfeatError, InputError
from .evaluation import classification_report, write_reports
from .loaders import eval_batches, resolve_loader, train_batches
from .model_files import (
    HEAD_FORMAT,
    checkpoint_spec,
    load_head,
    read_checkpoint,
    read_model_file,
    save_checkpoint,
)
from .outputs import OutputLock, check_output, check_reports
from .plots import require_matplotlib
from .reporting import epoch_line, progress
from .runtime import CompiledOrEager, autocast, choose_precision, compile_wanted, image_device
from .settings import FRESH_HEAD_SMOOTHING, SCHEDULES, Augment, FinetuneOptions
from .sources import Split, open_dataset
from .spec import FeatureSpec, plain
from .validation import ValidationPlan


@dataclass
class FinetuneResult:
    """The checkpoints, the per-epoch history (validation), what was validated on, the last epoch's
    validation report, and the test split's reports for the last model and best.pt, evaluated once."""

    checkpoint: Path
    best: Path
    history: list[dict] = field(default_factory=list)
    loader: str = ""
    device: str = ""
    precision: str = ""
    ranks: int = 1
    plan: ValidationPlan = field(default_factory=ValidationPlan)
    val: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    best_test: dict = field(default_factory=dict)
    precision_reason: str = ""
    compiled: bool = False

    @property
    def validation(self) -> str:
        """What validated: "holdout" (rows held out of train), "val" (the dataset's) or "test" (the recipe's)."""
        return self.plan.kind

    @property
    def best_valid_acc(self) -> float:
        return max((h["valid_acc"] for h in self.history), default=0.0)

    def metrics(self) -> dict:
        seconds = sum(h["seconds"] for h in self.history)
        images = sum(h["train_images"] for h in self.history)
        return {
            "command": "finetune",
            "epochs": self.history,
            "best_valid_acc": self.best_valid_acc,
            "final_valid_acc": self.history[-1]["valid_acc"] if self.history else None,
            "validation": self.validation,
            "val": self.val,
            "test": self.test,
            "best_test": self.best_test,
            "train_images_per_second": round(images / max(sum(h["train_seconds"] for h in self.history), 1e-9), 2),
            "seconds": round(seconds, 3),
            "checkpoint": str(self.checkpoint),
            "best": str(self.best),
            "loader": self.loader,
            "device": self.device,
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "compiled": self.compiled,
            "ranks": self.ranks,
        }

    def summary(self) -> str:
        """The command's closing line."""
        validated = self.plan.describe()
        return (f"fine-tuned {len(self.history)} epochs: best valid acc {self.best_valid_acc:.4f} ({validated}); "
                f"test acc {self.test['top1']:.4f} last, {self.best_test['top1']:.4f} best, evaluated once; "
                f"{self.metrics()['train_images_per_second']:.1f} train img/s -> {self.checkpoint} (best: {self.best})")


def check_options(opts: FinetuneOptions) -> None:
    """One-line InputErrors for values no training could use, before any data or model is loaded."""
    augmentation(opts)
    if opts.plot:
        require_matplotlib()
    opts.preprocess()  # refuses an unknown arch and sizes no crop could have, before any data is read


def augmentation(opts: FinetuneOptions) -> Augment:
    """The `--augment` preset with its parameters (refuses unknown presets and unusable values)."""
    return Augment(preset=opts.augment, jitter=opts.jitter, pad=opts.pad, crop_scale=tuple(opts.crop_scale))


def build_classifier(opts: FinetuneOptions, classes: list[str]) -> tuple[nn.Module, FeatureSpec, str]:
    """The backbone with a fresh (or `--init-head`) K-way layer where its classifier was; its spec and
    that layer's module path."""
    backbone = opts.build()
    head = nn.Linear(backbone.spec.feature_dim, len(classes))
    if opts.init_head:
        loaded, head_classes, head_spec = load_head(opts.init_head)
        head_spec.check_matches(backbone.spec, f"--init-head {opts.init_head}", "this backbone")
        if list(head_classes) != list(classes):
            raise InputError(f"--init-head {opts.init_head} has classes {head_classes}, the data has {classes}")
        head = loaded.as_linear()
    return backbone.with_head(head), backbone.spec, backbone.classifier


def label_smoothing(opts: FinetuneOptions) -> float:
    """`--label-smoothing`, by default 0.1 from a fresh head. From `--init-head` the default is the smoothing
    the head was fit with, so the loss does not change when the backbone joins (measured: docs/results.md)."""
    if opts.label_smoothing is not None:
        return opts.label_smoothing
    if opts.init_head:
        recorded = read_model_file(opts.init_head, HEAD_FORMAT).get("options")
        value = recorded.get("label_smoothing") if isinstance(recorded, dict) else None
        return float(value) if isinstance(value, (int, float)) and 0 <= value < 1 else 0.0
    return FRESH_HEAD_SMOOTHING


def make_optimizer(model: nn.Module, head_path: str, opts: FinetuneOptions) -> torch.optim.Optimizer:
    head = list(model.get_submodule(head_path).parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": backbone, "lr": opts.lr * opts.backbone_lr_scale}, {"params": head, "lr": opts.lr}]
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.lr, momentum=0.9, nesterov=True, weight_decay=opts.weight_decay)
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    raise InputError(f"unknown --optimizer {opts.optimizer!r}: choose sgd or adamw")


def make_schedule(optimizer: torch.optim.Optimizer, opts: FinetuneOptions, steps_per_epoch: int):
    """Per-step LambdaLR (backbone group, head group): linear warm-up, then cosine decay, a x0.1 step every
    third of the run, or flat. From `--init-head` (a trained head) the warm-up is head-only instead: the
    backbone holds still (lr 0; `Trainer.train_mode` keeps it in eval mode) while the head adapts to the
    augmented batches at full lr, then the backbone's lr ramps up over as many steps again."""
    total, warmup = opts.epochs * steps_per_epoch, warmup_steps(opts, steps_per_epoch)
    if opts.schedule not in SCHEDULES:
        raise InputError(f"unknown --schedule {opts.schedule!r}: choose {', '.join(SCHEDULES)}")

    def factor(step: int, hold: int = 0, warmup: int = warmup) -> float:
        if step < hold:
            return 0.0
        if step < hold + warmup:
            return (step - hold + 1) / warmup
        if opts.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - hold - warmup) / max(1, total - hold - warmup)))
        if opts.schedule == "step":
            return 0.1 ** (3 * step // max(1, total))
        return 1.0

    if opts.init_head:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [functools.partial(factor, hold=warmup),
                                                             functools.partial(factor, warmup=0)])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_steps(opts: FinetuneOptions, steps_per_epoch: int) -> int:
    """The warm-up's steps (with --init-head: the head-only steps)."""
    return int(opts.warmup_epochs * steps_per_epoch)


def epoch_order(n: int, seed: int, epoch: int, batch_size: int, world: World = World()) -> np.ndarray:
    """This rank's rows of a fresh shuffle per epoch, reproducible from (seed, epoch): ranks take
    disjoint, equal shares; the ragged tail is dropped so BatchNorm never sees a batch of one."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    step = batch_size * world.size
    if n > step:
        order = order[: n - n % step]
    return order[world.rank :: world.size]


class Trainer:
    """Holds the model, optimizer, scaler and schedule; runs epochs and writes checkpoints."""

    def __init__(self, opts: FinetuneOptions, classes: list[str], steps_per_epoch: int, world: World = World(),
                 device: torch.device | None = None):
        self.opts, self.world = opts, world
        self.device = device or image_device(opts.device)
        self.precision = choose_precision(self.device, opts.amp, opts.amp_dtype)
        self.dtype = self.precision.dtype
        self.memory_format = torch.channels_last if opts.channels_last else torch.contiguous_format
        model, spec, self.head_path = build_classifier(opts, classes)
        self.spec = spec.with_precision(self.precision.name)
        frozen = frozen_parameters(model, opts.arch, opts.freeze, self.head_path)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name not in frozen)
        # modules whose parameters are all frozen stay in eval mode: their BatchNorm statistics too
        self.frozen = [m for m in model.modules() if list(m.parameters()) and not any(p.requires_grad for p in m.parameters())]
        self.model = model.to(self.device, memory_format=self.memory_format)
        wrapped = self.model
        if world.distributed:
            wrapped = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        images = steps_per_epoch * opts.batch_size * world.size * opts.epochs
        self.forward = CompiledOrEager(wrapped, compile_wanted(opts.compile, images, self.device, "training", self.dtype))
        self.optimizer = make_optimizer(self.model, self.head_path, opts)
        self.schedule = make_schedule(self.optimizer, opts, steps_per_epoch)
        self.head_only = warmup_steps(opts, steps_per_epoch) if opts.init_head else 0  # the first steps
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing(opts))
        self.classes, self.epoch, self.history = classes, 0, []

    def train_mode(self) -> None:
        """BatchNorm trains in unfrozen layers only; frozen layers keep their running statistics; during a
        head-only warm-up the whole backbone does (the head sees the very features it was fit on)."""
        if self.schedule.last_epoch < self.head_only:
            self.model.eval()
            return
        self.model.train()
        for module in self.frozen:
            module.eval()

    def trained_batchnorm(self) -> list[nn.modules.batchnorm._BatchNorm]:
        """The BatchNorm layers whose statistics training moved: none during a head-only warm-up, and never
        a frozen one."""
        if self.schedule.last_epoch <= self.head_only:
            return []
        frozen = {id(m) for m in self.frozen}  # holds every module inside a frozen one, BatchNorm too
        return [m for m in self.model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and id(m) not in frozen]

    @torch.no_grad()
    def recompute_batchnorm(self, train: Split, loader: str) -> None:
        """Precise BatchNorm (Wu & Johnson, 2021): each trained BatchNorm layer's running statistics become the
        plain average of its batch statistics over a seeded sample of train (eval preprocessing, full batches)
        under the current weights. A running average lags weights that moved fast, as right after an
        --init-head warm-up (measured: docs/results.md)."""
        layers, images = self.trained_batchnorm(), min(self.opts.recompute_bn, len(train))
        if images > self.opts.batch_size:
            images -= images % self.opts.batch_size  # equal batches: each batch's statistics weigh the same
        if not layers or images < 2:
            return
        rows = np.sort(np.random.default_rng(self.opts.seed).choice(len(train), images, replace=False))
        momenta = [layer.momentum for layer in layers]
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average
        self.train_mode()
        for batch in eval_batches(train.take(rows), loader, self.spec.pre, self.opts.batch_size, self.device):
            with autocast(self.device, self.dtype):
                self.model(batch.contiguous(memory_format=self.memory_format))
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.head_only and self.schedule.last_epoch == self.head_only:  # the head-only warm-up ends: the backbone joins
            self.train_mode()
        images = images.contiguous(memory_format=self.memory_format)
        with autocast(self.device, self.dtype):
            logits = self.forward(images)
            loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return loss.detach() * len(labels), (logits.argmax(1) == labels).sum()

    def weights_finite(self) -> bool:
        """No nan or inf in any parameter or buffer: a diverged model is never checkpointed."""
        return bool(torch.stack([t.isfinite().all() for t in self.model.state_dict().values() if t.is_floating_point()]).all())

    @torch.no_grad()
    def logits(self, models: list, split: Split, loader: str) -> list[torch.Tensor]:
        """Every row's float32 logits of `split` under each of `models`, from one pass over its images: under
        torchrun each rank runs its shard and the shards are summed into place on every rank."""
        start, stop = shard_range(len(split), self.world)
        out = torch.zeros(len(models), len(split), len(self.classes), device=self.device)
        row = start
        for model in models:
            model.eval()
        for images in eval_batches(split.rows(start, stop), loader, self.spec.pre, self.opts.batch_size, self.device):
            images = images.contiguous(memory_format=self.memory_format)
            for i, model in enumerate(models):
                with autocast(self.device, self.dtype):
                    out[i, row : row + len(images)] = model(images).float()
            row += len(images)
        return list(all_reduce_sum(out, self.world))

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "classes": self.classes,
            "spec": self.spec.to_attrs(),
            "options": asdict(self.opts),
            # torch's global generator only: data order and augmentation come from (seed, epoch) generators,
            # and nothing draws from numpy's or python's; tensors and plain values load with weights_only=True
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.history = state["epoch"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])


# what a resumed run may change: where and how fast it runs, its reports, and --epochs (to train longer)
RUNTIME_OPTIONS = frozenset({"data", "download", "loader", "device", "amp", "amp_dtype", "channels_last", "compile",
                             "progress", "checkpoint_dir", "predictions", "plot", "resume", "epochs"})


def _resume(trainer: Trainer, last: Path) -> None:
    state = read_checkpoint(last)
    checkpoint_spec(state, last).check_matches(trainer.spec, f"cannot resume from {last}: it", "this run's backbone")
    if state["classes"] != trainer.classes:
        raise InputError(f"cannot resume from {last}: it has classes {state['classes']}, the data has {trainer.classes}")
    saved, now = state.get("options", {}), asdict(trainer.opts)
    changed = sorted(k for k in now if k not in RUNTIME_OPTIONS and k in saved and plain(saved[k]) != plain(now[k]))
    if changed:
        raise InputError(f"cannot resume from {last}: it was trained with different " + ", ".join(
            f"--{k.replace('_', '-')} ({saved[k]!r}, now {now[k]!r})" for k in changed) +
            " (rerun with those, or choose another --checkpoint-dir)")
    trainer.load_state(state)


def finetune(opts: FinetuneOptions, log=print) -> FinetuneResult:
    """Fine-tune the whole network (minus `--freeze`d stages) on train less a validation holdout, validating
    each epoch; then evaluate the test split once with the last model and best.pt.

    Under torchrun: DistributedDataParallel, each rank on a disjoint share of every epoch's shuffle;
    losses and accuracies are summed over ranks; only rank 0 logs, writes checkpoints and holds their lock.
    """
    check_options(opts)
    check_output(opts.checkpoint_dir, "--checkpoint-dir", directory=True)
    check_reports(opts.predictions, opts.plot)
    with OutputLock(opts.checkpoint_dir) if is_main_process() else nullcontext():
        return _finetune(opts, log)


def _finetune(opts: FinetuneOptions, log) -> FinetuneResult:
    world, device = init_world(opts.device)
    dataset = open_dataset(opts.data, opts.dataset, None, opts.limit, opts.download, opts.seed, opts.source_inputs())
    dataset.require_every_class()
    loader = resolve_loader(opts.loader)
    aug = augmentation(opts)
    plan = ValidationPlan.choose("val" in dataset.splits, opts.val_fraction, opts.seed, owner="dataset")
    train, val, test = validation_split(plan, dataset.splits)
    steps = max(1, -(-len(epoch_order(len(train), 0, 0, opts.batch_size, world)) // opts.batch_size))
    trainer = Trainer(opts, list(dataset.classes), steps, world, device)
    last, best = Path(opts.checkpoint_dir) / "last.pt", Path(opts.checkpoint_dir) / "best.pt"
    if last.exists() and not opts.resume:
        raise InputError(f"{last} exists: pass --resume to continue that run, or choose another --checkpoint-dir")
    if opts.resume and last.exists():
        _resume(trainer, last)
    elif opts.resume and world.is_main:
        log(f"fastfeat finetune: no checkpoint at {last} to resume: starting a new run")
    val_labels = torch.from_numpy(val.labels).to(device)
    val_logits = None
    while trainer.epoch < opts.epochs:
        start = time.perf_counter()
        train_loss, train_acc, images, train_seconds = train_epoch(trainer, train, loader, aug)
        trainer.recompute_batchnorm(train, loader)
        (val_logits,) = trainer.logits([trainer.forward], val, loader)
        valid_loss = F.cross_entropy(val_logits, val_labels).item()
        valid_acc = (val_logits.argmax(1) == val_labels).float().mean().item()
        seconds = time.perf_counter() - start
        if not (math.isfinite(valid_loss) and trainer.weights_finite()):
            raise FastfeatError(f"training diverged in epoch {trainer.epoch} (valid loss {valid_loss}); nothing was saved "
                                f"for it: lower --lr (now {opts.lr})")
        record = {
            "epoch": trainer.epoch, "train_loss": train_loss, "train_acc": train_acc, "valid_loss": valid_loss,
            "valid_acc": valid_acc, "seconds": round(seconds, 3), "train_seconds": round(train_seconds, 3),
            "train_images": images, "train_images_per_second": round(images / max(train_seconds, 1e-9), 2),
        }
        is_best = valid_acc > max((h["valid_acc"] for h in trainer.history), default=-1.0)
        trainer.history.append(record)
        trainer.epoch += 1
        if world.is_main:
            log(epoch_line(record["epoch"], train_loss, train_acc, valid_loss, valid_acc, seconds))
            state = trainer.state()
            save_checkpoint(state, last)
            if is_best:
                save_checkpoint(state, best)
        barrier(world)
    if val_logits is None:  # a resumed run that had nothing left to train
        (val_logits,) = trainer.logits([trainer.forward], val, loader)
    test_logits, last_test, best_test = _test_once(trainer, test, loader, best)
    result = FinetuneResult(last, best, trainer.history, loader, str(device), trainer.precision.name, world.size,
                            plan, report(val_logits, val_labels), last_test, best_test,
                            trainer.precision.reason, trainer.forward.compiled)
    if world.is_main:
        files = None if test.files is None else [str(Path(f).relative_to(dataset.root)) for f in test.files]
        write_reports(opts.predictions, opts.plot, test_logits.softmax(1).cpu(), torch.from_numpy(test.labels),
                      list(dataset.classes), files, trainer.history, last_test, plan.kind)
    return result


def validation_split(plan: ValidationPlan, splits: dict[str, Split]) -> tuple[Split, Split, Split]:
    """(train, val, test) as `plan` says: the dataset's own val split (all of train to fit), a holdout of
    train, or the test split to validate on (the recipe's protocol)."""
    train, test = splits["train"], splits["test"]
    if plan.kind == "val":
        return train, splits["val"], test
    rows = plan.split(train.labels)
    if rows is None:
        return train, test, test
    return train.take(rows[0]), train.take(rows[1]), test


def report(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Loss, top-1 (and top-5), mean per-class and per-class accuracy, and the confusion matrix."""
    return {"loss": F.cross_entropy(logits, labels).item(), **classification_report(logits.cpu(), labels.cpu())}


def _test_once(trainer: Trainer, test: Split, loader: str, best: Path) -> tuple[torch.Tensor, dict, dict]:
    """The last model's test logits, and the test split's reports for the last model and for best.pt, from
    one pass over the test images (one model when the last epoch is the best)."""
    accs = [h["valid_acc"] for h in trainer.history]
    models = [trainer.forward]
    if accs.index(max(accs)) != len(accs) - 1:
        best_model = copy.deepcopy(trainer.model)
        best_model.load_state_dict(read_checkpoint(best)["model"])
        models.append(best_model)
    logits = trainer.logits(models, test, loader)
    labels = torch.from_numpy(test.labels).to(trainer.device)
    reports = [report(scores, labels) for scores in logits]
    return logits[0], reports[0], reports[-1]


def train_epoch(trainer: Trainer, train: Split, loader: str, aug: Augment) -> tuple[float, float, int, float]:
    """One pass over this rank's share of the epoch's shuffle; loss, accuracy and images summed over ranks."""
    opts, world, device = trainer.opts, trainer.world, trainer.device
    order = epoch_order(len(train), opts.seed, trainer.epoch, opts.batch_size, world)
    labels = torch.from_numpy(train.labels[order]).to(device)
    seed = int(np.random.SeedSequence([opts.seed, trainer.epoch, world.rank]).generate_state(1)[0])
    batches = train_batches(train, loader, trainer.spec.pre, aug, opts.batch_size, device, order, seed)
    trainer.train_mode()
    totals = torch.zeros(2, device=device)  # loss sum, correct
    row, start = 0, time.perf_counter()
    with progress(len(order) * world.size, f"finetune epoch {trainer.epoch}", opts.progress and world.is_main) as bar:
        for images in batches:
            loss, hits = trainer.step(images, labels[row : row + len(images)])
            totals += torch.stack([loss, hits.float()])
            row += len(images)
            bar.update(len(images) * world.size)
    seconds = time.perf_counter() - start
    loss_sum, correct, rows = all_reduce_sum(torch.cat([totals.double().cpu(), torch.tensor([row], dtype=torch.float64)]), world).tolist()
    return loss_sum / max(rows, 1), correct / max(rows, 1), int(rows), seconds
