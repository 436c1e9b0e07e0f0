"""`fastfeat finetune`: augmented batches through the whole network with mixed precision.

Unlike the original recipe (whose optimizer held only `fc`), the backbone really is updated:
backbone parameters at lr x backbone_lr_scale, the head at lr.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .backbone import frozen_parameters
from .distributed import World, all_reduce_sum, barrier, init_world, shard_range
from .errors import FastfeatError, InputError, check_number
from .loaders import eval_batches, resolve_loader, train_batches
from .model_files import checkpoint_spec, load_head, read_checkpoint, save_checkpoint
from .options import BackboneOptions, DataOptions, RunOptions, option
from .reporting import epoch_line, progress
from .runtime import amp_dtype, autocast, precision_name, resolve_device
from .sources import Split, open_dataset
from .spec import FeatureSpec
from .transforms import Augment, Preprocess

SCHEDULES = ("cosine", "step", "none")


@dataclass
class FinetuneOptions(RunOptions, BackboneOptions, DataOptions):
    batch_size: int = option(64, "images per batch (per rank under torchrun)", group="device and precision")
    jitter: float = option(0.0, "ColorJitter strength (the recipe's ColorJitter() is 0: no change)", group="training")
    epochs: int = option(5, "passes over the train split", group="training")
    lr: float = option(0.01, "the head's learning rate", group="training")
    backbone_lr_scale: float = option(0.1, "backbone lr = lr x this", group="training")
    optimizer: str = option("sgd", "nesterov SGD or AdamW", choices=("sgd", "adamw"), group="training")
    schedule: str = option("cosine", "per-step decay after the warm-up", choices=SCHEDULES, group="training")
    warmup_epochs: float = option(0.5, "linear lr warm-up", group="training")
    weight_decay: float = option(5e-4, "L2 weight decay", group="training")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing", group="training")
    freeze: str = option("none", "what stays frozen: a named stage (resnet: stem, layer1..layer3), a fraction of the "
                                 "backbone (0.5), or module names; `--freeze help` lists an arch's", group="training")
    init_head: str | None = option(None, "start from a head made by train-head on the same features", group="training")
    checkpoint_dir: str = option("data/finetune", "where last.pt and best.pt go", group="training")
    resume: bool = option(False, "continue from CHECKPOINT_DIR/last.pt", group="training")


@dataclass
class FinetuneResult:
    checkpoint: Path
    best: Path
    history: list[dict] = field(default_factory=list)
    loader: str = ""
    device: str = ""
    precision: str = ""
    ranks: int = 1

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
            "train_images_per_second": round(images / max(sum(h["train_seconds"] for h in self.history), 1e-9), 2),
            "seconds": round(seconds, 3),
            "checkpoint": str(self.checkpoint),
            "best": str(self.best),
            "loader": self.loader,
            "device": self.device,
            "precision": self.precision,
            "ranks": self.ranks,
        }


def check_options(opts: FinetuneOptions) -> None:
    """One-line InputErrors for values no training could use, before any data or model is loaded."""
    if opts.batch_size < 1 or opts.epochs < 1:
        raise InputError("--batch-size and --epochs must be at least 1")
    check_number("--lr", opts.lr, low_open=True)
    for flag, value in (("--backbone-lr-scale", opts.backbone_lr_scale), ("--weight-decay", opts.weight_decay),
                        ("--warmup-epochs", opts.warmup_epochs), ("--jitter", opts.jitter)):
        check_number(flag, value)
    check_number("--label-smoothing", opts.label_smoothing, high=1.0)
    opts.preprocess()  # refuses an unknown arch and sizes no crop could have, before any data is read


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
    """Per-step LambdaLR: linear warm-up, then cosine decay, a x0.1 step every third of the run, or flat."""
    total, warmup = opts.epochs * steps_per_epoch, int(opts.warmup_epochs * steps_per_epoch)
    if opts.schedule not in SCHEDULES:
        raise InputError(f"unknown --schedule {opts.schedule!r}: choose {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if opts.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if opts.schedule == "step":
            return 0.1 ** (3 * step // max(1, total))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
        self.device = device or resolve_device(opts.device)
        self.dtype = amp_dtype(self.device, opts.amp, opts.amp_dtype)
        self.memory_format = torch.channels_last if opts.channels_last else torch.contiguous_format
        model, spec, self.head_path = build_classifier(opts, classes)
        self.spec = spec.with_precision(precision_name(self.dtype))
        frozen = frozen_parameters(model, opts.arch, opts.freeze, self.head_path)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name not in frozen)
        # modules whose parameters are all frozen stay in eval mode: their BatchNorm statistics too
        self.frozen = [m for m in model.modules() if list(m.parameters()) and not any(p.requires_grad for p in m.parameters())]
        self.model = model.to(self.device, memory_format=self.memory_format)
        wrapped = self.model
        if world.distributed:
            wrapped = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(wrapped) if opts.compile else wrapped
        self.optimizer = make_optimizer(self.model, self.head_path, opts)
        self.schedule = make_schedule(self.optimizer, opts, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)
        self.classes, self.epoch, self.history = classes, 0, []

    def train_mode(self) -> None:
        """BatchNorm trains in unfrozen layers only; frozen layers keep their running statistics."""
        self.model.train()
        for module in self.frozen:
            module.eval()

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    def evaluate(self, batches, labels: torch.Tensor) -> tuple[float, float]:
        """Mean loss and accuracy over `batches` (this rank's rows), summed over all ranks."""
        self.model.eval()
        loss_sum = correct = 0.0
        row = 0
        criterion = nn.CrossEntropyLoss(reduction="sum")
        for images in batches:
            target = labels[row : row + len(images)]
            with autocast(self.device, self.dtype):
                logits = self.forward(images.contiguous(memory_format=self.memory_format)).float()
            loss_sum += criterion(logits, target).item()
            correct += (logits.argmax(1) == target).sum().item()
            row += len(images)
        loss_sum, correct, row = all_reduce_sum(torch.tensor([loss_sum, correct, row], dtype=torch.float64), self.world).tolist()
        return loss_sum / max(row, 1), correct / max(row, 1)

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


def _resume(trainer: Trainer, last: Path) -> None:
    state = read_checkpoint(last)
    checkpoint_spec(state, last).check_matches(trainer.spec, f"cannot resume from {last}: it", "this run's backbone")
    if state["classes"] != trainer.classes:
        raise InputError(f"cannot resume from {last}: it has classes {state['classes']}, the data has {trainer.classes}")
    trainer.load_state(state)


def finetune(opts: FinetuneOptions, log=print) -> FinetuneResult:
    """Fine-tune the whole network (minus `--freeze`d stages) on the train split, validating each epoch.

    Under torchrun: DistributedDataParallel, each rank on a disjoint share of every epoch's shuffle;
    losses and accuracies are summed over ranks; only rank 0 logs and writes checkpoints.
    """
    check_options(opts)
    world, device = init_world(opts.device)
    dataset = open_dataset(opts.data, opts.dataset, ("train", "test"), opts.limit, opts.download, opts.seed)
    dataset.require_every_class()
    loader = resolve_loader(opts.loader)
    aug = Augment(jitter=opts.jitter)
    train, test = dataset.splits["train"], dataset.splits["test"].rows(*shard_range(len(dataset.splits["test"]), world))
    steps = max(1, -(-len(epoch_order(len(train), 0, 0, opts.batch_size, world)) // opts.batch_size))
    trainer = Trainer(opts, list(dataset.classes), steps, world, device)
    pre = trainer.spec.pre
    last, best = Path(opts.checkpoint_dir) / "last.pt", Path(opts.checkpoint_dir) / "best.pt"
    if last.exists() and not opts.resume:
        raise InputError(f"{last} exists: pass --resume to continue that run, or choose another --checkpoint-dir")
    if opts.resume and last.exists():
        _resume(trainer, last)
    elif opts.resume and world.is_main:
        log(f"fastfeat finetune: no checkpoint at {last} to resume: starting a new run")
    test_labels = torch.from_numpy(test.labels).to(device)
    while trainer.epoch < opts.epochs:
        start = time.perf_counter()
        train_loss, train_acc, images, train_seconds = train_epoch(trainer, train, loader, pre, aug)
        valid_loss, valid_acc = trainer.evaluate(eval_batches(test, loader, pre, opts.batch_size, device), test_labels)
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
    return FinetuneResult(last, best, trainer.history, loader, str(device), precision_name(trainer.dtype), world.size)


def train_epoch(trainer: Trainer, train: Split, loader: str, pre: Preprocess, aug: Augment) -> tuple[float, float, int, float]:
    """One pass over this rank's share of the epoch's shuffle; loss, accuracy and images summed over ranks."""
    opts, world, device = trainer.opts, trainer.world, trainer.device
    order = epoch_order(len(train), opts.seed, trainer.epoch, opts.batch_size, world)
    labels = torch.from_numpy(train.labels[order]).to(device)
    seed = int(np.random.SeedSequence([opts.seed, trainer.epoch, world.rank]).generate_state(1)[0])
    batches = train_batches(train, loader, pre, aug, opts.batch_size, device, order, seed)
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
