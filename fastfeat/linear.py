"""One linear head fitted on feature tensors: mini-batch `sgd` / `adamw` or full-batch `lbfgs`.

`sgd` and `adamw` run mini-batch epochs over a `torch.randperm` shuffle of the train rows with a per-step
cosine learning-rate decay; `lbfgs` is the classic linear-probe protocol: full-batch L-BFGS on multinomial
logistic regression, each epoch one `LBFGS.step` of up to `LBFGS_ITERS_PER_EPOCH` iterations (it stops early
once converged; `lr` scales its steps, `batch_size` does not apply).

`weight_decay` is the L2 coefficient λ of  mean cross-entropy + λ/2 ||W||²  for `sgd` and `lbfgs`
(the bias is not penalised; by default λ = 100 / train rows, 2e-3 for 50,000 rows: like scikit-learn's
C, a fixed penalty on the summed loss), and AdamW's decoupled decay for `adamw`. Features are
standardised with the train split's mean and std; the head applies the same standardisation to raw features.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FastfeatError
from .model_files import LinearHead
from .reporting import epoch_line
from .rows import StreamedRows, TrainRows, as_rows
from .settings import DEFAULT_LR
from .views import FlipAverage, ViewSampler

if TYPE_CHECKING:
    from .settings import HeadOptions

ADAMW_WEIGHT_DECAY = 0.5
L2_ROWS = 100.0
LBFGS_ITERS_PER_EPOCH = 25
LBFGS_EVALS_PER_EPOCH = LBFGS_ITERS_PER_EPOCH * 5 // 4 + 1  # torch's max_eval, then the train evaluation


def with_defaults(opts: HeadOptions, train_rows: int) -> HeadOptions:
    """`opts` with the optimizer's default lr and weight decay filled in."""
    weight_decay = ADAMW_WEIGHT_DECAY if opts.optimizer == "adamw" else L2_ROWS / max(train_rows, 1)
    return replace(opts, lr=DEFAULT_LR[opts.optimizer] if opts.lr is None else opts.lr,
                   weight_decay=weight_decay if opts.weight_decay is None else opts.weight_decay)


def fit_head(train_x: torch.Tensor | StreamedRows, train_y: torch.Tensor, test_x: torch.Tensor | StreamedRows,
             test_y: torch.Tensor, num_classes: int, opts: HeadOptions, log: Callable[[str], None] = print,
             sampler: ViewSampler | None = None, tta: bool = False) -> tuple[LinearHead, list[dict]]:
    """The training loop on tensors (or rows streamed from the cache): returns the trained head and the
    per-epoch history. With a `sampler`, each epoch trains on its views of the rows (standardised with the
    center crops' statistics); under `tta`, `test_x` is (N, 2, D) center and flip pairs."""
    opts = with_defaults(opts, len(train_y))
    rows = as_rows(train_x, train_y, sampler)
    head = new_head(rows, num_classes, opts.standardize)
    validation = as_rows(test_x, test_y, None)
    history = train_epochs(head, opts, rows, log, lambda: evaluate_rows(evaluated(head, tta), validation),
                           f"lower --lr (now {opts.lr})")
    return head, history


def refit_head(x: torch.Tensor | StreamedRows, y: torch.Tensor, num_classes: int, opts: HeadOptions,
               log: Callable[[str], None] = print, sampler: ViewSampler | None = None) -> tuple[LinearHead, list[dict]]:
    """The single-head path (`new_head`, `train_epochs`) on x without a holdout: history holds train numbers only.
    With a `sampler`, each epoch trains on its views (see `fit_head`)."""
    rows = as_rows(x, y, sampler)
    head = new_head(rows, num_classes, opts.standardize)
    history = train_epochs(head, opts, rows, log, None, f"pass --no-refit, or leave lr {opts.lr} out of --lrs")
    return head, history


def train_epochs(head: LinearHead, opts: HeadOptions, rows: TrainRows, log: Callable[[str], None],
                 validate: Callable[[], tuple[float, float]] | None, remedy: str) -> list[dict]:
    """`opts.epochs` epochs of `head` on `rows` (each epoch's views of them), each followed by `validate`
    (loss, accuracy; None: train numbers only); one line per epoch; a diverging head stops with `remedy`."""
    run_epoch, history = epoch_runner(head, opts, rows), []
    for epoch in range(opts.epochs):
        epoch_start = time.perf_counter()
        rows.start_epoch(epoch)
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


def evaluated(head: nn.Module, tta: bool) -> nn.Module:
    """What evaluation runs: the head, or under TTA the head on (center, flip) pairs, probabilities averaged."""
    return FlipAverage(head) if tta else head


def new_head(rows: TrainRows, num_classes: int, standardize: bool = True) -> LinearHead:
    """A zero head on the rows' device, standardising with their statistics if asked."""
    return LinearHead(rows.dim, num_classes, *(rows.stats() if standardize else (None, None))).to(rows.device)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def evaluate_rows(model: nn.Module, rows: TrainRows) -> tuple[float, float]:
    """`evaluate` over every part of `rows`, each weighted by its share of the rows."""
    loss = accuracy = 0.0
    for x, y in rows.passes():
        part_loss, part_accuracy = evaluate(model, x, y)
        loss, accuracy = loss + part_loss * (len(y) / rows.rows), accuracy + part_accuracy * (len(y) / rows.rows)
    return loss, accuracy


def epoch_runner(head: LinearHead, opts: HeadOptions, rows: TrainRows) -> Callable[[], tuple[float, float]]:
    """A function that trains one epoch and returns (train loss, train acc)."""
    if opts.optimizer == "lbfgs":
        lbfgs = make_lbfgs(head, opts.lr)

        def lbfgs_run() -> tuple[float, float]:
            lbfgs_epoch(lbfgs, head, rows, opts.weight_decay, opts.label_smoothing)
            return evaluate_rows(head, rows)

        return lbfgs_run
    optimizer = make_optimizer(head, opts)
    schedule = cosine_schedule(optimizer, opts.epochs * math.ceil(rows.rows / opts.batch_size))
    generator = torch.Generator(device=rows.device).manual_seed(opts.seed)
    return lambda: sgd_epoch(head, optimizer, schedule, rows.shuffled(opts.batch_size, generator), rows.rows, opts)


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
              batches: Iterable[tuple[torch.Tensor, torch.Tensor]], rows: int, opts: HeadOptions) -> tuple[float, float]:
    """One shuffled pass over `rows` rows in mini-batches (`TrainRows.shuffled`); returns the mean training
    loss and accuracy over its batches."""
    device = head.fc.weight.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for inputs, target in batches:
        logits = head(inputs)
        loss = F.cross_entropy(logits, target, label_smoothing=opts.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach() * len(target)
        correct += (logits.argmax(1) == target).sum()
    return loss_sum.item() / rows, correct.item() / rows


def make_lbfgs(head: LinearHead, lr: float = 1.0, max_iter: int = LBFGS_ITERS_PER_EPOCH) -> torch.optim.LBFGS:
    """Strong-Wolfe L-BFGS; a step stops early once max |gradient| <= 1e-5: at 1e-4 a flat objective (weak L2,
    as many features as rows) stops short of the minimum (tests/test_head.py checks it against scikit-learn's)."""
    return torch.optim.LBFGS(head.fc.parameters(), lr=lr, max_iter=max_iter, history_size=20,
                             tolerance_grad=1e-5, tolerance_change=1e-9, line_search_fn="strong_wolfe")


def lbfgs_epoch(optimizer: torch.optim.LBFGS, head: LinearHead, rows: TrainRows, weight_decay: float,
                label_smoothing: float = 0.0) -> None:
    """One full-batch L-BFGS step on mean cross-entropy + weight_decay/2 ||W||²: the loss and gradient of
    every part of `rows` (all of them at once in memory, block by block streamed), weighted by its share."""
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = None
        for x, y in rows.passes():
            part = F.cross_entropy(head(x), y, label_smoothing=label_smoothing) * (len(y) / rows.rows)
            part.backward()
            loss = part.detach() if loss is None else loss + part.detach()
        penalty = 0.5 * weight_decay * head.fc.weight.square().sum()
        penalty.backward()
        return loss + penalty.detach()

    optimizer.step(closure)
