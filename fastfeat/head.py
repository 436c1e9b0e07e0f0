"""`fastfeat train-head`: train the 512->K linear head from a feature cache, in seconds.

The cache is read once into float32 tensors on the device. `sgd` and `adamw` run mini-batch epochs
over a `torch.randperm` shuffle of the train rows with a per-step cosine learning-rate decay;
`lbfgs` is the classic linear-probe protocol: full-batch L-BFGS on multinomial logistic regression,
each epoch one `LBFGS.step` of up to `LBFGS_ITERS_PER_EPOCH` iterations (it stops early once converged;
`lr` scales its steps, `batch_size` does not apply).

`weight_decay` is the L2 coefficient λ of  mean cross-entropy + λ/2 ||W||²  for `sgd` and `lbfgs`
(the bias is not penalised; by default λ = 100 / train rows, 2e-3 for 50,000 rows: like scikit-learn's
C, a fixed penalty on the summed loss), and AdamW's decoupled decay for `adamw`. Features are
standardised with the train split's mean and std; the saved head applies the same standardisation
to raw features.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import DEFAULT_ARCH
from .cache_file import read_cache
from .errors import FastfeatError, InputError, check_number
from .model_files import LinearHead, save_head
from .options import option
from .reporting import epoch_line
from .runtime import resolve_device
from .sources import stratified_holdout
from .spec import FeatureSpec

# what HeadOptions' None lr and weight_decay become (tuned against a tuned L-BFGS probe); L2 = L2_ROWS / rows
DEFAULT_LR = {"sgd": 0.2, "adamw": 3e-3, "lbfgs": 1.0}
ADAMW_WEIGHT_DECAY = 0.5
L2_ROWS = 100.0
LBFGS_ITERS_PER_EPOCH = 25


@dataclass
class HeadOptions:
    """Defaults: 20 epochs of nesterov SGD, batch 1024, lr 0.2 with cosine decay, L2 100 / train rows on
    standardised features. `lr` and `weight_decay` left None take the optimizer's defaults."""

    cache: str = option(f"data/cifar10-{DEFAULT_ARCH}.h5", "a fastfeat cache")
    out: str | None = option(None, "head file (default: <cache stem>.head.pt beside the cache)")
    epochs: int = option(20, "passes over the train split")
    batch_size: int = option(1024, "rows per step (sgd, adamw)")
    lr: float | None = option(None, "learning rate (default: 0.2 sgd, 3e-3 adamw, 1.0 lbfgs)")
    optimizer: str = option("sgd", "nesterov SGD with cosine decay, AdamW, or full-batch L-BFGS",
                            choices=tuple(DEFAULT_LR))
    weight_decay: float | None = option(None, "L2 on the weight (default: 100 / train rows for sgd and lbfgs; "
                                              "0.5 decoupled for adamw)")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    standardize: bool = option(True, "standardise features with the train split's mean and std")
    val_fraction: float = option(0.1, "share of train held out (class-stratified, drawn with --seed) to validate on every "
                                      "epoch; test is evaluated once, at the end. 0: validate on test every epoch "
                                      "(the recipe's protocol: any choice made from it is made on test)")
    seed: int = option(0, "shuffles and the validation split")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")


@dataclass
class HeadResult:
    """Where the head went, seconds spent training (not loading or saving), the options with their
    defaults filled in, the per-epoch history (validation), what was validated on, and the test split's
    loss and top-1 accuracy, evaluated once with the final head."""

    out: Path
    seconds: float
    device: str
    options: dict
    history: list[dict] = field(default_factory=list)
    validation: str = "holdout"  # "holdout": rows held out of train; "test": the recipe's protocol
    test: dict = field(default_factory=dict)

    @property
    def best_valid_acc(self) -> float:
        return max((h["valid_acc"] for h in self.history), default=0.0)

    @property
    def final_valid_acc(self) -> float:
        return self.history[-1]["valid_acc"] if self.history else 0.0

    def metrics(self) -> dict:
        return {
            "command": "train-head",
            "epochs": self.history,
            "best_valid_acc": self.best_valid_acc,
            "final_valid_acc": self.final_valid_acc,
            "validation": self.validation,
            "test": self.test,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "options": self.options,
            "out": str(self.out),
        }


def train_head(opts: HeadOptions, log: Callable[[str], None] = print) -> HeadResult:
    """Train the head on the cache's train split less a validation holdout (the epoch lines' "Valid"),
    evaluate the test split once with the final head, and save it. With `val_fraction` 0 the epoch
    lines validate on test, as the original recipe did."""
    check_options(opts)
    device = resolve_device(opts.device)
    spec, classes, (train_x, train_y, test_x, test_y) = load_features(opts.cache, device)
    fit_x, fit_y, val_x, val_y = holdout(train_x, train_y, test_x, test_y, opts.val_fraction, opts.seed)
    opts = with_defaults(opts, len(fit_y))
    out = Path(opts.out) if opts.out else default_out(opts.cache)
    if out.resolve() == Path(opts.cache).resolve():
        raise InputError(f"--out {out} is the cache itself: choose another file")
    start = time.perf_counter()
    head, history = fit_head(fit_x, fit_y, val_x, val_y, len(classes), opts, log)
    seconds = time.perf_counter() - start
    test_loss, test_acc = evaluate(head, test_x, test_y)
    save_head(out, head, classes, spec, asdict(opts), opts.standardize)
    validation = "holdout" if opts.val_fraction > 0 else "test"
    return HeadResult(out, seconds, str(device), asdict(opts), history, validation, {"loss": test_loss, "top1": test_acc})


def holdout(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
            fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fit_x, fit_y, val_x, val_y): a class-stratified, seeded `fraction` of train held out to validate
    on; with fraction 0, all of train to fit and the test split to validate on (the recipe's protocol)."""
    if fraction == 0:
        return train_x, train_y, test_x, test_y
    fit, val = (torch.from_numpy(rows).to(train_x.device)
                for rows in stratified_holdout(train_y.cpu().numpy(), fraction, seed))
    if len(val) == 0:
        raise InputError(f"--val-fraction {fraction} holds out no row of {len(train_y)}: raise it, or pass 0")
    return train_x[fit], train_y[fit], train_x[val], train_y[val]


def fit_head(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             num_classes: int, opts: HeadOptions, log: Callable[[str], None] = print) -> tuple[LinearHead, list[dict]]:
    """The training loop on tensors: returns the trained head and the per-epoch history."""
    opts = with_defaults(opts, len(train_y))
    head = new_head(train_x, num_classes, opts.standardize)
    run_epoch, history = epoch_runner(head, opts, train_x, train_y), []
    for epoch in range(opts.epochs):
        epoch_start = time.perf_counter()
        train_loss, train_acc = run_epoch()
        valid_loss, valid_acc = evaluate(head, test_x, test_y)
        seconds = time.perf_counter() - epoch_start
        if not math.isfinite(train_loss) or not all(p.isfinite().all() for p in head.parameters()):
            raise FastfeatError(f"the head diverged in epoch {epoch} (train loss {train_loss}); nothing was saved: "
                                f"lower --lr (now {opts.lr})")
        history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                        "valid_loss": valid_loss, "valid_acc": valid_acc, "seconds": round(seconds, 4)})
        log(epoch_line(epoch, train_loss, train_acc, valid_loss, valid_acc, seconds))
    return head, history


def check_options(opts: HeadOptions) -> None:
    """One-line InputErrors for values no training could use (None lr and weight decay are fine)."""
    if opts.optimizer not in DEFAULT_LR:
        raise InputError(f"unknown --optimizer {opts.optimizer!r}: choose sgd, adamw or lbfgs")
    if opts.epochs < 1 or opts.batch_size < 1:
        raise InputError("--epochs and --batch-size must be at least 1")
    if opts.lr is not None:
        check_number("--lr", opts.lr, low_open=True)
    if opts.weight_decay is not None:
        check_number("--weight-decay", opts.weight_decay)
    check_number("--label-smoothing", opts.label_smoothing, high=1.0)
    check_number("--val-fraction", opts.val_fraction, high=1.0)


def with_defaults(opts: HeadOptions, train_rows: int) -> HeadOptions:
    """Checked `opts` with the optimizer's default lr and weight decay filled in."""
    check_options(opts)
    weight_decay = ADAMW_WEIGHT_DECAY if opts.optimizer == "adamw" else L2_ROWS / max(train_rows, 1)
    return replace(opts, lr=DEFAULT_LR[opts.optimizer] if opts.lr is None else opts.lr,
                   weight_decay=weight_decay if opts.weight_decay is None else opts.weight_decay)


def load_features(path: str | Path, device: torch.device) -> tuple[FeatureSpec, list[str], list[torch.Tensor]]:
    """A complete cache as (spec, classes, [train_x, train_y, test_x, test_y]) on `device`."""
    cache = read_cache(path, ("train", "test"))
    classes = cache.classes
    for split, labels in cache.labels.items():
        if len(labels) == 0:
            raise InputError(f"{path}: the {split} split is empty")
        if labels.min() < 0 or labels.max() >= len(classes):
            raise InputError(f"{path}: {split} labels are outside 0..{len(classes) - 1} ({len(classes)} classes)")
        missing = [name for name, count in zip(classes, np.bincount(labels, minlength=len(classes))) if count == 0]
        if missing:
            raise InputError(f"{path}: the {split} split has no rows of class {', '.join(missing)}")
    tensors = [torch.from_numpy(a).to(device) for s in ("train", "test") for a in (cache.features[s], cache.labels[s])]
    return FeatureSpec.from_attrs(cache.attrs, str(path)), classes, tensors


def default_out(cache: str | Path) -> Path:
    """`<cache stem>.head.pt` beside the cache."""
    return Path(cache).with_suffix(".head.pt")


def feature_stats(x: torch.Tensor, rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (constant features get std 1). Two passes over row blocks:
    `torch.std(x, 0)` is ten times slower on a CPU."""
    mean = x.mean(0)
    squares = torch.zeros_like(mean)
    for block in x.split(rows):
        squares += (block - mean).square().sum(0)
    std = (squares / max(len(x) - 1, 1)).sqrt()
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def new_head(x: torch.Tensor, num_classes: int, standardize: bool = True) -> LinearHead:
    """A zero head on x's device, standardising with x's statistics if asked."""
    return LinearHead(x.shape[1], num_classes, *(feature_stats(x) if standardize else (None, None))).to(x.device)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def epoch_runner(head: LinearHead, opts: HeadOptions, x: torch.Tensor, y: torch.Tensor) -> Callable[[], tuple[float, float]]:
    """A function that trains one epoch and returns (train loss, train acc)."""
    if opts.optimizer == "lbfgs":
        lbfgs = make_lbfgs(head, opts.lr)

        def lbfgs_run() -> tuple[float, float]:
            lbfgs_epoch(lbfgs, head, x, y, opts.weight_decay, opts.label_smoothing)
            return evaluate(head, x, y)

        return lbfgs_run
    optimizer = make_optimizer(head, opts)
    schedule = cosine_schedule(optimizer, opts.epochs * math.ceil(len(y) / opts.batch_size))
    generator = torch.Generator(device=x.device).manual_seed(opts.seed)
    return lambda: sgd_epoch(head, optimizer, schedule, x, y, opts, generator)


def make_optimizer(head: LinearHead, opts: HeadOptions) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW; weight decay on the weight only, like the L-BFGS objective."""
    groups = [{"params": [head.fc.weight], "weight_decay": opts.weight_decay},
              {"params": [head.fc.bias], "weight_decay": 0.0}]
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=opts.lr)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay from lr to 0."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))


def sgd_epoch(head: LinearHead, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
              x: torch.Tensor, y: torch.Tensor, opts: HeadOptions, generator: torch.Generator) -> tuple[float, float]:
    """One shuffled pass in mini-batches; returns the mean training loss and accuracy over its batches.

    Batches are gathered into one reused buffer: a fresh large tensor per batch costs page faults
    that take longer than the whole step on a CPU."""
    buffer = x.new_empty(min(opts.batch_size, len(x)), x.shape[1])
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for idx in torch.randperm(len(y), generator=generator, device=x.device).split(opts.batch_size):
        inputs, target = torch.index_select(x, 0, idx, out=buffer[: len(idx)]), y[idx]
        logits = head(inputs)
        loss = F.cross_entropy(logits, target, label_smoothing=opts.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach() * len(target)
        correct += (logits.argmax(1) == target).sum()
    return loss_sum.item() / len(y), correct.item() / len(y)


def make_lbfgs(head: LinearHead, lr: float = 1.0, max_iter: int = LBFGS_ITERS_PER_EPOCH) -> torch.optim.LBFGS:
    """Strong-Wolfe L-BFGS; a step stops early once max |gradient| <= 1e-4 (converged for float32)."""
    return torch.optim.LBFGS(head.fc.parameters(), lr=lr, max_iter=max_iter, history_size=20,
                             tolerance_grad=1e-4, tolerance_change=1e-9, line_search_fn="strong_wolfe")


def lbfgs_epoch(optimizer: torch.optim.LBFGS, head: LinearHead, x: torch.Tensor, y: torch.Tensor,
                weight_decay: float, label_smoothing: float = 0.0) -> None:
    """One full-batch L-BFGS step on mean cross-entropy + weight_decay/2 ||W||²."""
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y, label_smoothing=label_smoothing)
        loss = loss + 0.5 * weight_decay * head.fc.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
