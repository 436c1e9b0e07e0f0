"""`train-head --sweep`'s batched trainer: a grid of sgd heads (learning rates x weight decays) trained at
once as one program, each head exactly as `linear.sgd_epoch` would train it alone, and its table."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import FastfeatError
from .model_files import LinearHead
from .rows import StreamedRows, as_rows
from .settings import SWEEP_L2_ROWS, SWEEP_LRS
from .views import ViewSampler, flip_average

if TYPE_CHECKING:
    from .settings import HeadOptions



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


def sweep_fit(x: torch.Tensor | StreamedRows, y: torch.Tensor, val_x: torch.Tensor | StreamedRows, val_y: torch.Tensor, num_classes: int,
              lrs: tuple[float, ...], weight_decays: tuple[float, ...], opts: HeadOptions,
              log: Callable[[str], None] = print, sampler: ViewSampler | None = None) -> SweepHeads:
    """Train len(lrs) x len(weight_decays) sgd heads at once, as `sgd_epoch` trains one: features
    standardised once, zero init, the same shuffles (one seeded randperm per epoch), mini-batches, mean
    cross-entropy (label smoothing too) with a hand-written gradient, L2 on the weight only, nesterov
    momentum 0.9 and the per-step cosine decay, each head with its own lr and weight decay. A head whose
    loss or weights stop being finite is frozen at zero and reported as diverged. With a `sampler`, each
    epoch trains on its views (see `fit_head`); (N, 2, D) `val_x` are center and flip pairs (TTA). Each
    batch is standardised as it arrives, so streamed rows (each block read once an epoch) feed every head."""
    train = as_rows(x, y, sampler)
    device, dim, k = train.device, train.dim, num_classes
    heads = len(lrs) * len(weight_decays)
    if opts.standardize:
        mean, std = train.stats()
    else:
        mean, std = torch.zeros(dim, device=device), torch.ones(dim, device=device)
    lr = torch.tensor([a for a in lrs for _ in weight_decays], dtype=torch.float32, device=device)
    wd = torch.tensor([b for _ in lrs for b in weight_decays], dtype=torch.float32, device=device).view(1, heads, 1)
    weight = torch.zeros(dim, heads, k, device=device)  # (D, H, K): one GEMM for every head's logits
    bias = torch.zeros(heads, k, device=device)
    weight_buf, bias_buf = torch.zeros_like(weight), torch.zeros_like(bias)
    weight_grad = torch.empty_like(weight)
    flat_weight, flat_bias, flat_grad = weight.view(dim, heads * k), bias.view(heads * k), weight_grad.view(dim, heads * k)
    live = torch.ones(heads, dtype=torch.bool, device=device)
    buffer = torch.empty(min(opts.batch_size, train.rows), dim, device=device)
    eye = torch.eye(k, device=device)
    smoothing = opts.label_smoothing
    total_steps, step = opts.epochs * math.ceil(train.rows / opts.batch_size), 0
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    loss_sum = torch.zeros(heads, device=device)
    for epoch in range(opts.epochs):
        epoch_start = time.perf_counter()
        loss_sum.zero_()
        train.start_epoch(epoch)
        for rows, labels in train.shuffled(opts.batch_size, generator):
            n = len(labels)
            inputs = standardized(rows, mean, std, out=buffer[:n])
            target = eye[labels]
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
        losses = (loss_sum / train.rows)[live]
        log(f"Sweep epoch {epoch}. {int(live.sum())} of {heads} heads, train loss {losses.min().item() if len(losses) else float('nan'):f} "
            f"(best) to {losses.max().item() if len(losses) else float('nan'):f}, {time.perf_counter() - epoch_start:.2f} s")
    with torch.no_grad():
        correct = torch.zeros(heads, device=device)
        for part_x, part_y in as_rows(val_x, val_y, None).passes():
            for block, labels in zip(part_x.split(8192), part_y.split(8192)):
                logits = sweep_logits(block, mean, std, flat_weight, flat_bias, k)
                correct += (logits.argmax(-1) == labels.unsqueeze(1)).sum(0)
    alive = live.tolist()
    val_acc = [acc if ok else None for acc, ok in zip((correct / len(val_y)).tolist(), alive)]
    train_loss = [loss if ok else None for loss, ok in zip((loss_sum / train.rows).tolist(), alive)]
    return SweepHeads(tuple(lrs), tuple(weight_decays), weight, bias, mean, std, val_acc, train_loss)


def sweep_logits(block: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, flat_weight: torch.Tensor,
                 flat_bias: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, K) every sweep head's logits of a (B, D) block, or of (B, 2, D) center and flip pairs the log of
    the mean of the two probabilities."""
    views = block.unbind(1) if block.ndim == 3 else (block,)
    logits = [torch.addmm(flat_bias, standardized(v, mean, std), flat_weight).view(len(v), -1, num_classes)
              for v in views]
    return logits[0] if len(logits) == 1 else flip_average(*logits)


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
