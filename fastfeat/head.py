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

from . import evaluation
from .backbone import DEFAULT_ARCH
from .cache_file import cached_splits, read_cache, split_files
from .errors import FastfeatError, InputError, check_number
from .evaluation import classification_report
from .model_files import LinearHead, save_head
from .options import option
from .plots import require_matplotlib
from .reporting import epoch_line
from .runtime import resolve_device
from .sources import stratified_holdout
from .spec import FeatureSpec
from .views import (
    VIEW_POLICIES,
    FlipAverage,
    HeadViews,
    ViewSampler,
    flip_average,
    load_views,
)

# what HeadOptions' None lr and weight_decay become (tuned against a tuned L-BFGS probe); L2 = L2_ROWS / rows
DEFAULT_LR = {"sgd": 0.2, "adamw": 3e-3, "lbfgs": 1.0}
SWEEP_LRS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
SWEEP_L2_ROWS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)  # the default weight decays: these / fit rows
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
                                      "(the recipe's protocol: any choice made from it is made on test). A cache with its own val "
                                      "split (a folder's val/ beside test/) validates on that instead")
    seed: int = option(0, "shuffles and the validation split")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    sweep: bool = option(False, "train a grid of sgd heads (--lrs x --weight-decays) at once as one batched program, "
                                "pick the best by validation accuracy (ties: the larger weight decay), then refit it")
    lrs: tuple[float, ...] | None = option(None, "--sweep learning rates, comma-separated (default: "
                                                 + ",".join(f"{v:g}" for v in SWEEP_LRS) + ")")
    weight_decays: tuple[float, ...] | None = option(None, "--sweep L2 strengths, comma-separated (default: "
                                                           + ",".join(f"{v:g}" for v in SWEEP_L2_ROWS) + " / fit rows)")
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
    validation: str = "holdout"  # "holdout": rows held out of train; "val": the cache's val split; "test": the recipe's
    test: dict = field(default_factory=dict)
    sweep: dict | None = None  # --sweep: the grid, its validation accuracies and the chosen setting
    views: dict = field(default_factory=dict)  # the views policy, each train view's rows read, the TTA

    @property
    def best_valid_acc(self) -> float:
        if self.sweep is not None:  # the chosen head's holdout accuracy (the refit has no holdout)
            return self.sweep["best"]["val_acc"]
        return max((h["valid_acc"] for h in self.history), default=0.0)

    @property
    def final_valid_acc(self) -> float:
        if self.sweep is not None:
            return self.sweep["best"]["val_acc"]
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
            **({"sweep": self.sweep} if self.sweep is not None else {}),
            "views": self.views,
        }

    def views_line(self) -> str:
        """Which views trained and evaluated the head, for the output."""
        names, read = self.views.get("names", ["center"]), self.views.get("rows_read")
        used = ", ".join(f"{n} {r}" for n, r in zip(names, read)) + " rows read" if read else "center crops only"
        return f"views: {used} (--views-policy {self.views.get('policy')}); test-time flip: {self.views.get('tta')}"


def train_head(opts: HeadOptions, log: Callable[[str], None] = print) -> HeadResult:
    """Train the head on the cache's train split less a validation holdout (the epoch lines' "Valid"),
    evaluate the test split once with the final head, and save it. With `val_fraction` 0 the epoch
    lines validate on test, as the original recipe did."""
    check_options(opts)
    if opts.sweep:
        return train_sweep(opts, log)
    device = resolve_device(opts.device)
    spec, classes, (train_x, train_y, test_x, test_y) = load_features(opts.cache, device)
    fit_x, fit_y, val_x, val_y, validation = validation_split(opts, device, train_x, train_y, test_x, test_y)
    views, sampler, val_x = with_views(opts, device, train_y, fit_x, val_x, validation)
    opts = with_defaults(opts, len(fit_y))
    out = Path(opts.out) if opts.out else default_out(opts.cache)
    if out.resolve() == Path(opts.cache).resolve():
        raise InputError(f"--out {out} is the cache itself: choose another file")
    start = time.perf_counter()
    head, history = fit_head(fit_x, fit_y, val_x, val_y, len(classes), opts, log, sampler, views.tta)
    seconds = time.perf_counter() - start
    model, test_in = evaluated(head, views.tta), views.evaluation_input(test_x, views.flips.get("test"))
    test = test_report(model, test_in, test_y)
    save_head(out, head, classes, spec, asdict(opts), opts.standardize)
    result = HeadResult(out, seconds, str(device), asdict(opts), history, validation, test, views=views.report(sampler))
    write_reports(opts, result, model, test_in, test_y, classes)
    return result


def validation_split(opts: HeadOptions, device: torch.device, train_x: torch.Tensor, train_y: torch.Tensor,
                     test_x: torch.Tensor, test_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(fit_x, fit_y, val_x, val_y, kind): the cache's own val split when it has one (kind "val": a folder's
    val/ beside test/; fit on all of train), else `holdout` (kind "holdout", or "test" at --val-fraction 0)."""
    own = own_val_split(opts.cache, device)
    if own is not None:
        return train_x, train_y, *own, "val"
    kind = "holdout" if opts.val_fraction > 0 else "test"
    return (*holdout(train_x, train_y, test_x, test_y, opts.val_fraction, opts.seed), kind)


def own_val_split(cache: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The features and labels of the cache's own val split, if it has one."""
    if "val" not in cached_splits(cache):
        return None
    data = read_cache(cache, ("val",))
    return torch.from_numpy(data.features["val"]).to(device), torch.from_numpy(data.labels["val"]).to(device)


def with_views(opts: HeadOptions, device: torch.device, train_y: torch.Tensor, fit_x: torch.Tensor,
               val_x: torch.Tensor, validation: str) -> tuple[HeadViews, ViewSampler | None, torch.Tensor]:
    """The cache's views as `opts` use them: the sampler of the fit rows' views, and the validation rows
    (held-out train, the val split, or test) as evaluation takes them (with their flips under TTA)."""
    views = load_views(opts.cache, device, opts.views_policy, opts.tta, validation)
    if validation != "holdout":
        return views, views.sampler(fit_x, None, opts.seed), views.evaluation_input(val_x, views.flips.get(validation))
    fit, val = holdout_rows(train_y, opts.val_fraction, opts.seed)
    return views, views.sampler(fit_x, fit, opts.seed), views.evaluation_input(val_x, views.flips.get("train"), val)


def evaluated(head: nn.Module, tta: bool) -> nn.Module:
    """What evaluation runs: the head, or under TTA the head on (center, flip) pairs, probabilities averaged."""
    return FlipAverage(head) if tta else head


def write_reports(opts: HeadOptions, result: HeadResult, head: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor,
                  classes: list[str]) -> None:
    """`--predictions` and `--plot` of a finished run (`head` and `test_x` as the test evaluation took them:
    under TTA, the flip average on center and flip pairs)."""
    if opts.predictions or opts.plot:
        with torch.no_grad():
            probabilities = head(test_x).softmax(1)
        files = split_files(opts.cache, "test") if opts.predictions else None
        evaluation.write_reports(opts.predictions, opts.plot, probabilities, test_y, classes, files, result.history,
                                 result.test, result.validation, result.sweep)


def holdout(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
            fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fit_x, fit_y, val_x, val_y): a class-stratified, seeded `fraction` of train held out to validate
    on; with fraction 0, all of train to fit and the test split to validate on (the recipe's protocol)."""
    rows = holdout_rows(train_y, fraction, seed)
    if rows is None:
        return train_x, train_y, test_x, test_y
    fit, val = rows
    return train_x[fit], train_y[fit], train_x[val], train_y[val]


def holdout_rows(train_y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (fit, validation) train rows of `holdout`; None with fraction 0."""
    if fraction == 0:
        return None
    fit, val = (torch.from_numpy(rows).to(train_y.device)
                for rows in stratified_holdout(train_y.cpu().numpy(), fraction, seed))
    if len(val) == 0:
        raise InputError(f"--val-fraction {fraction} holds out no row of {len(train_y)}: raise it, or pass 0")
    return fit, val


def fit_head(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             num_classes: int, opts: HeadOptions, log: Callable[[str], None] = print,
             sampler: ViewSampler | None = None, tta: bool = False) -> tuple[LinearHead, list[dict]]:
    """The training loop on tensors: returns the trained head and the per-epoch history. With a `sampler`,
    each epoch trains on its views of the rows (standardised with the center crops' statistics); under
    `tta`, `test_x` is (N, 2, D) center and flip pairs."""
    opts = with_defaults(opts, len(train_y))
    head = new_head(train_x if sampler is None else sampler.buffer, num_classes, opts.standardize)
    history = train_epochs(head, opts, train_x, train_y, log, sampler,
                           lambda: evaluate(evaluated(head, tta), test_x, test_y), f"lower --lr (now {opts.lr})")
    return head, history


def train_epochs(head: LinearHead, opts: HeadOptions, x: torch.Tensor, y: torch.Tensor, log: Callable[[str], None],
                 sampler: ViewSampler | None, validate: Callable[[], tuple[float, float]] | None,
                 remedy: str) -> list[dict]:
    """`opts.epochs` epochs of `head` on x (or each epoch's views of it), each followed by `validate` (loss,
    accuracy; None: train numbers only); one line per epoch; a diverging head stops with `remedy`."""
    x = x if sampler is None else sampler.buffer
    run_epoch, history = epoch_runner(head, opts, x, y), []
    for epoch in range(opts.epochs):
        epoch_start = time.perf_counter()
        if sampler is not None:
            sampler.refresh(epoch)
        train_loss, train_acc = run_epoch()
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
        if validate is not None:
            record["valid_loss"], record["valid_acc"] = validate()
        seconds = time.perf_counter() - epoch_start
        if not math.isfinite(train_loss) or not all(p.isfinite().all() for p in head.parameters()):
            what = "head" if validate is not None else "refit head"
            raise FastfeatError(f"the {what} diverged in epoch {epoch} (train loss {train_loss}); nothing was saved: "
                                f"{remedy}")
        history.append({**record, "seconds": round(seconds, 4)})
        log(epoch_line(epoch, train_loss, train_acc, record["valid_loss"], record["valid_acc"], seconds)
            if validate is not None else f"Refit epoch {epoch}. Train Loss: {train_loss:f}, Train Acc: {train_acc:f}")
    return history


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
    if opts.plot:
        require_matplotlib()
    for flag, values in (("--lrs", opts.lrs or ()), ("--weight-decays", opts.weight_decays or ())):
        if values and not opts.sweep:
            raise InputError(f"{flag} is the --sweep grid: add --sweep, or give one value with {flag[:-1]}")
        for value in values:
            check_number(flag, value, low_open=flag == "--lrs")
    if opts.sweep:
        if opts.optimizer != "sgd":
            raise InputError(f"--sweep trains sgd heads only, not --optimizer {opts.optimizer}")
        if opts.lr is not None or opts.weight_decay is not None:
            raise InputError("--sweep tries the --lrs x --weight-decays grid: drop --lr and --weight-decay")
        if opts.val_fraction == 0:
            raise InputError("--sweep picks its head on a holdout of train: --val-fraction must be > 0 "
                             "(0 would choose it on test)")


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
        check_labels(path, split, labels, classes)
    tensors = [torch.from_numpy(a).to(device) for s in ("train", "test") for a in (cache.features[s], cache.labels[s])]
    return FeatureSpec.from_attrs(cache.attrs, str(path)), classes, tensors


def check_labels(path: str | Path, split: str, labels: np.ndarray, classes: list[str]) -> None:
    """Refuse in one line a split that is empty, has labels outside the classes, or lacks a class."""
    if len(labels) == 0:
        raise InputError(f"{path}: the {split} split is empty")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise InputError(f"{path}: {split} labels are outside 0..{len(classes) - 1} ({len(classes)} classes)")
    missing = [name for name, count in zip(classes, np.bincount(labels, minlength=len(classes))) if count == 0]
    if missing:
        raise InputError(f"{path}: the {split} split has no rows of class {', '.join(missing)}")


def default_out(cache: str | Path) -> Path:
    """`<cache stem>.head.pt` beside the cache."""
    return Path(cache).with_suffix(".head.pt")


def feature_stats(x: torch.Tensor, rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (constant features get std 1). Two passes over row blocks:
    `torch.std(x, 0)` is much slower on a CPU."""
    mean = x.mean(0)
    squares = torch.zeros_like(mean)
    for block in x.split(rows):
        squares += (block - mean).square().sum(0)
    std = (squares / max(len(x) - 1, 1)).sqrt()
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def new_head(x: torch.Tensor, num_classes: int, standardize: bool = True) -> LinearHead:
    """A zero head on x's device, standardising with x's statistics if asked."""
    return LinearHead(x.shape[1], num_classes, *(feature_stats(x) if standardize else (None, None))).to(x.device)


def test_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The test split, evaluated once: its loss, top-1 (and top-5), mean per-class and per-class accuracy,
    and the confusion matrix."""
    with torch.no_grad():
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y).item(), **classification_report(logits, y)}


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


# ---- --sweep: a grid of sgd heads trained at once -------------------------------------------------------



@dataclass
class SweepHeads:
    """The heads of a sweep, in standardised space: head h = (lrs[h // len(wds)], wds[h % len(wds)]) has
    weight `weight[:, h, :].T` (K x D, like `LinearHead.fc.weight`) and bias `bias[h]`. `weight` is laid out
    (D, H, K) so that one (B, D) x (D, H*K) GEMM computes every head's logits. `val_acc[h]` is None for a
    head that diverged (it was frozen at zero)."""

    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    val_acc: list[float | None]
    train_loss: list[float | None]

    def index(self, lr_index: int, wd_index: int) -> int:
        return lr_index * len(self.weight_decays) + wd_index

    def head(self, h: int) -> LinearHead:
        """Head `h` as a LinearHead on raw features (the sweep's standardisation folded in as usual)."""
        dim, _, classes = self.weight.shape
        head = LinearHead(dim, classes, self.mean, self.std).to(self.weight.device)
        with torch.no_grad():
            head.fc.weight.copy_(self.weight[:, h, :].T)
            head.fc.bias.copy_(self.bias[h])
        return head

    def best(self) -> int:
        """The head with the best validation accuracy; ties: the larger weight decay, then the smaller lr."""
        candidates = [h for h, acc in enumerate(self.val_acc) if acc is not None]
        if not candidates:
            raise FastfeatError("every head of the sweep diverged; nothing was saved: lower --lrs")
        n_wd = len(self.weight_decays)
        return max(candidates, key=lambda h: (self.val_acc[h], self.weight_decays[h % n_wd], -self.lrs[h // n_wd]))

    def grid(self) -> list[list[float | None]]:
        """Validation accuracy per lr (rows) x weight decay (columns)."""
        n_wd = len(self.weight_decays)
        return [self.val_acc[i * n_wd : (i + 1) * n_wd] for i in range(len(self.lrs))]


def sweep_grid(opts: HeadOptions, fit_rows: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (lrs, weight decays) of a sweep: the given ones, or the defaults around the single head's."""
    lrs = tuple(opts.lrs or SWEEP_LRS)
    wds = tuple(opts.weight_decays or (c / max(fit_rows, 1) for c in SWEEP_L2_ROWS))
    return lrs, wds


def standardized(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, rows: int = 8192,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / std as a float32 tensor (new, or `out`), in row blocks (no full-size temporary)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device) if out is None else out
    for block, target in zip(x.split(rows), out.split(rows)):
        torch.sub(block, mean, out=target).div_(std)
    return out


def sweep_fit(x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, num_classes: int,
              lrs: tuple[float, ...], weight_decays: tuple[float, ...], opts: HeadOptions,
              log: Callable[[str], None] = print, sampler: ViewSampler | None = None) -> SweepHeads:
    """Train len(lrs) x len(weight_decays) sgd heads at once, as `sgd_epoch` trains one: features
    standardised once, zero init, the same shuffles (one seeded randperm per epoch), mini-batches, mean
    cross-entropy (label smoothing too) with a hand-written gradient, L2 on the weight only, nesterov
    momentum 0.9 and the per-step cosine decay, each head with its own lr and weight decay. A head whose
    loss or weights stop being finite is frozen at zero and reported as diverged. With a `sampler`, each
    epoch trains on its views (see `fit_head`); (N, 2, D) `val_x` are center and flip pairs (TTA)."""
    x = x if sampler is None else sampler.buffer
    device, dim, k = x.device, x.shape[1], num_classes
    heads = len(lrs) * len(weight_decays)
    if opts.standardize:
        mean, std = feature_stats(x)
    else:
        mean, std = torch.zeros(dim, device=device), torch.ones(dim, device=device)
    z = standardized(x, mean, std)
    lr = torch.tensor([a for a in lrs for _ in weight_decays], dtype=torch.float32, device=device)
    wd = torch.tensor([b for _ in lrs for b in weight_decays], dtype=torch.float32, device=device).view(1, heads, 1)
    weight = torch.zeros(dim, heads, k, device=device)  # (D, H, K): one GEMM for every head's logits
    bias = torch.zeros(heads, k, device=device)
    weight_buf, bias_buf = torch.zeros_like(weight), torch.zeros_like(bias)
    weight_grad = torch.empty_like(weight)
    flat_weight, flat_bias, flat_grad = weight.view(dim, heads * k), bias.view(heads * k), weight_grad.view(dim, heads * k)
    live = torch.ones(heads, dtype=torch.bool, device=device)
    batch = min(opts.batch_size, len(y))
    buffer = z.new_empty(batch, dim)
    eye = torch.eye(k, device=device)
    smoothing = opts.label_smoothing
    total_steps, step = opts.epochs * math.ceil(len(y) / opts.batch_size), 0
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    loss_sum = torch.zeros(heads, device=device)
    for epoch in range(opts.epochs):
        epoch_start = time.perf_counter()
        loss_sum.zero_()
        if sampler is not None:
            standardized(sampler.refresh(epoch), mean, std, out=z)
        for idx in torch.randperm(len(y), generator=generator, device=device).split(opts.batch_size):
            n = len(idx)
            inputs = torch.index_select(z, 0, idx, out=buffer[:n])
            target = eye[y[idx]]
            if smoothing:
                target = target * (1 - smoothing) + smoothing / k
            logits = torch.addmm(flat_bias, inputs, flat_weight).view(n, heads, k)
            lse = logits.logsumexp(-1)  # (B, H)
            loss_sum += lse.sum(0) - torch.einsum("bhk,bk->h", logits, target)
            grad = logits.sub_(lse.unsqueeze(-1)).exp_().sub_(target.unsqueeze(1)).div_(n)  # softmax - target, mean
            torch.mm(inputs.T, grad.view(n, heads * k), out=flat_grad)
            factor = 0.5 * (1 + math.cos(math.pi * step / total_steps))
            step_lr = (lr * factor).view(1, heads, 1)
            # torch.optim.SGD(momentum=0.9, nesterov=True): d = g + wd p; buf = 0.9 buf + d; p -= lr (d + 0.9 buf)
            weight_grad.addcmul_(weight, wd)
            weight_buf.mul_(0.9).add_(weight_grad)
            weight.addcmul_(weight_grad.add_(weight_buf, alpha=0.9), step_lr, value=-1)
            bias_grad = grad.sum(0)
            bias_buf.mul_(0.9).add_(bias_grad)
            bias.addcmul_(bias_grad.add_(bias_buf, alpha=0.9), step_lr.view(heads, 1), value=-1)
            step += 1
        finite = loss_sum.isfinite() & weight.isfinite().all(2).all(0) & bias.isfinite().all(1)
        diverged = live & ~finite
        if diverged.any():  # freeze them at zero: their columns never touch the other heads'
            live &= ~diverged
            lr.masked_fill_(diverged, 0.0)
            for tensor in (weight, weight_buf):
                tensor[:, diverged] = 0.0
            for tensor in (bias, bias_buf):
                tensor[diverged] = 0.0
        losses = (loss_sum / len(y))[live]
        log(f"Sweep epoch {epoch}. {int(live.sum())} of {heads} heads, train loss {losses.min().item() if len(losses) else float('nan'):f} "
            f"(best) to {losses.max().item() if len(losses) else float('nan'):f}, {time.perf_counter() - epoch_start:.2f} s")
    with torch.no_grad():
        correct = torch.zeros(heads, device=device)
        for block, labels in zip(val_x.split(8192), val_y.split(8192)):
            logits = sweep_logits(block, mean, std, flat_weight, flat_bias, k)
            correct += (logits.argmax(-1) == labels.unsqueeze(1)).sum(0)
    alive = live.tolist()
    val_acc = [acc if ok else None for acc, ok in zip((correct / len(val_y)).tolist(), alive)]
    train_loss = [loss if ok else None for loss, ok in zip((loss_sum / len(y)).tolist(), alive)]
    return SweepHeads(tuple(lrs), tuple(weight_decays), weight, bias, mean, std, val_acc, train_loss)


def sweep_logits(block: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, flat_weight: torch.Tensor,
                 flat_bias: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, K) every sweep head's logits of a (B, D) block, or of (B, 2, D) center and flip pairs the log of
    the mean of the two probabilities."""
    views = block.unbind(1) if block.ndim == 3 else (block,)
    logits = [torch.addmm(flat_bias, standardized(v, mean, std), flat_weight).view(len(v), -1, num_classes)
              for v in views]
    return logits[0] if len(logits) == 1 else flip_average(*logits)


def refit_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, opts: HeadOptions,
               log: Callable[[str], None] = print, sampler: ViewSampler | None = None) -> tuple[LinearHead, list[dict]]:
    """The single-head path (`new_head`, `train_epochs`) on x without a holdout: history holds train numbers only.
    With a `sampler`, each epoch trains on its views (see `fit_head`)."""
    head = new_head(x if sampler is None else sampler.buffer, num_classes, opts.standardize)
    history = train_epochs(head, opts, x, y, log, sampler, None,
                           f"pass --no-refit, or leave lr {opts.lr} out of --lrs")
    return head, history


def train_sweep(opts: HeadOptions, log: Callable[[str], None] = print) -> HeadResult:
    """`--sweep`: the grid trained at once on train less the holdout, the best head chosen on the holdout,
    refit on all of train (unless --no-refit), test evaluated once with the chosen head, saved as usual."""
    check_options(opts)
    device = resolve_device(opts.device)
    spec, classes, (train_x, train_y, test_x, test_y) = load_features(opts.cache, device)
    fit_x, fit_y, val_x, val_y, validation = validation_split(opts, device, train_x, train_y, test_x, test_y)
    views, sampler, val_x = with_views(opts, device, train_y, fit_x, val_x, validation)
    out = Path(opts.out) if opts.out else default_out(opts.cache)
    if out.resolve() == Path(opts.cache).resolve():
        raise InputError(f"--out {out} is the cache itself: choose another file")
    lrs, wds = sweep_grid(opts, len(fit_y))
    log(f"sweep: {len(lrs) * len(wds)} sgd heads, {len(fit_y)} fit rows, {len(val_y)} validation rows; "
        f"lrs {', '.join(f'{v:g}' for v in lrs)}; weight decays {', '.join(f'{v:.3g}' for v in wds)}")
    start = time.perf_counter()
    sweep = sweep_fit(fit_x, fit_y, val_x, val_y, len(classes), lrs, wds, opts, log, sampler)
    sweep_seconds = time.perf_counter() - start
    best = sweep.best()
    best_lr, best_wd = lrs[best // len(wds)], wds[best % len(wds)]
    chosen = replace(opts, lr=best_lr, weight_decay=best_wd, lrs=lrs, weight_decays=wds)
    log(f"sweep: best lr {best_lr:g}, weight decay {best_wd:.3g}: valid acc {sweep.val_acc[best]:.4f} "
        f"({sweep_seconds:.2f} s)")
    history: list[dict] = []
    if opts.refit:
        sampler = views.sampler(train_x, None, opts.seed)
        head, history = refit_head(train_x, train_y, len(classes), chosen, log, sampler)
    else:
        head = sweep.head(best)
    seconds = time.perf_counter() - start
    model, test_in = evaluated(head, views.tta), views.evaluation_input(test_x, views.flips.get("test"))
    test = test_report(model, test_in, test_y)
    save_head(out, head, classes, spec, asdict(chosen), opts.standardize)
    grid = {"lrs": list(lrs), "weight_decays": list(wds), "val_acc": sweep.grid(),
            "best": {"lr": best_lr, "weight_decay": best_wd, "val_acc": sweep.val_acc[best]},
            "refit": opts.refit, "seconds": round(sweep_seconds, 3)}
    result = HeadResult(out, seconds, str(device), asdict(chosen), history, validation, test, grid, views.report(sampler))
    write_reports(opts, result, model, test_in, test_y, classes)
    return result


def sweep_table(sweep: dict) -> list[str]:
    """Validation accuracy per lr (rows) x weight decay (columns), the chosen one starred; '-' diverged."""
    best = sweep["best"]
    lines = ["val acc   " + " ".join(f"{'wd ' + format(wd, '.3g'):>10} " for wd in sweep["weight_decays"])]
    for lr, row in zip(sweep["lrs"], sweep["val_acc"]):
        cells = []
        for wd, acc in zip(sweep["weight_decays"], row):
            mark = "*" if (lr, wd) == (best["lr"], best["weight_decay"]) else " "
            cells.append(f"{'-' if acc is None else f'{acc:.4f}':>10}{mark}")
        lines.append(f"lr {lr:<7g}" + " ".join(cells))
    return lines
