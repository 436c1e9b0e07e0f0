"""`fastfeat train-head`: train the 512->K linear head from a feature cache, in seconds.

The cache is read once into float32 tensors on the device. `sgd` and `adamw` run mini-batch epochs
over a `torch.randperm` shuffle of the train rows with a per-step cosine learning-rate decay;
`lbfgs` is the classic linear-probe protocol: full-batch L-BFGS on multinomial logistic regression,
each epoch one `LBFGS.step` of up to `LBFGS_ITERS_PER_EPOCH` iterations (it stops early once converged).

`weight_decay` is the L2 coefficient λ of  mean cross-entropy + λ/2 ||W||²  for `sgd` and `lbfgs`
(the bias is not penalised), and AdamW's decoupled decay for `adamw`. Features are standardised
with the train split's mean and std; the saved head applies the same standardisation to raw features.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FEATURE_DIM
from .cache_file import read_cache
from .errors import InputError
from .reporting import atomic_torch_save, epoch_line
from .runtime import resolve_device, seed_everything

HEAD_FORMAT = "fastfeat-head"
OPTIMIZERS = ("sgd", "adamw", "lbfgs")
LBFGS_ITERS_PER_EPOCH = 25
# what a head records about the features it was trained on; MATCH_ATTRS must agree to reuse it
CACHE_ATTRS = ("fastfeat_version", "backbone", "feature_dim", "weights", "weights_sha256", "image_size", "resize",
               "mean", "std", "amp_dtype", "feature_dtype", "dataset")
MATCH_ATTRS = ("backbone", "weights_sha256", "image_size", "resize", "mean", "std")
REFERENCE_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class HeadOptions:
    cache: str
    out: str | None = None
    epochs: int = 20
    batch_size: int = 512
    lr: float = 0.1
    optimizer: str = "sgd"
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    standardize: bool = True
    seed: int = 0
    device: str = "auto"


@dataclass
class HeadResult:
    out: Path
    seconds: float
    device: str
    history: list[dict] = field(default_factory=list)

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
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "out": str(self.out),
        }


class Standardize(nn.Module):
    """(x - mean) / std with fixed per-feature statistics."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def make_head(linear: nn.Linear, stats: tuple[torch.Tensor, torch.Tensor] | None) -> nn.Sequential:
    """The head as used on raw features: optional standardisation, then `linear`."""
    return nn.Sequential(Standardize(*stats) if stats is not None else nn.Identity(), linear)


def feature_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std; constant features get std 1 so they stay finite."""
    mean, std = x.mean(0), x.std(0)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def lbfgs_epoch(optimizer: torch.optim.LBFGS, linear: nn.Linear, x: torch.Tensor, y: torch.Tensor,
                weight_decay: float, label_smoothing: float = 0.0) -> None:
    """One full-batch L-BFGS step on mean cross-entropy + weight_decay/2 ||W||²."""
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y, label_smoothing=label_smoothing)
        loss = loss + 0.5 * weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def make_lbfgs(linear: nn.Linear) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=LBFGS_ITERS_PER_EPOCH, history_size=20,
                             tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")


def zero_linear(num_classes: int, device: torch.device) -> nn.Linear:
    """nn.Linear(512, K) starting at zero: the problem is convex, so no random init is needed."""
    linear = nn.Linear(FEATURE_DIM, num_classes, device=device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, epochs: int = 40) -> nn.Linear:
    """L2 logistic regression on (x, y) by full-batch L-BFGS, run until converged or `epochs` steps."""
    linear = zero_linear(num_classes, x.device)
    optimizer = make_lbfgs(linear)
    for _ in range(epochs):
        lbfgs_epoch(optimizer, linear, x, y, weight_decay)
    return linear


def fit_lbfgs_reference(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                        num_classes: int | None = None, grid: tuple[float, ...] = REFERENCE_L2_GRID,
                        holdout: float = 0.2, seed: int = 0) -> tuple[float, float]:
    """A tuned linear probe: standardise, pick the L2 strength on a held-out `holdout` of train
    (best accuracy), refit on all of train. Returns (test accuracy, chosen L2 strength)."""
    k = num_classes or int(max(train_y.max(), test_y.max())) + 1
    mean, std = feature_stats(train_x)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    held, fit = order[: int(holdout * len(order))], order[int(holdout * len(order)):]

    def held_out_acc(l2: float) -> float:
        return evaluate(fit_lbfgs(train_x[fit], train_y[fit], k, l2), train_x[held], train_y[held])[1]

    best = max(grid, key=lambda l2: (held_out_acc(l2), l2))
    return evaluate(fit_lbfgs(train_x, train_y, k, best), test_x, test_y)[1], best


def check_options(opts: HeadOptions) -> None:
    if opts.optimizer not in OPTIMIZERS:
        raise InputError(f"unknown --optimizer {opts.optimizer!r}: choose sgd, adamw or lbfgs")
    if opts.epochs < 1 or opts.batch_size < 1:
        raise InputError("--epochs and --batch-size must be at least 1")
    if not opts.lr > 0 or not opts.weight_decay >= 0:
        raise InputError(f"--lr must be > 0 and --weight-decay >= 0, got {opts.lr} and {opts.weight_decay}")
    if not 0 <= opts.label_smoothing < 1:
        raise InputError(f"--label-smoothing must be in [0, 1), got {opts.label_smoothing}")


def load_features(path: str | Path, device: torch.device) -> tuple[dict, list[str], list[torch.Tensor]]:
    """A complete 512-d cache as (attrs, classes, [train_x, train_y, test_x, test_y]) on `device`."""
    cache = read_cache(path, ("train", "test"), FEATURE_DIM)
    if cache.attrs.get("feature_dim", FEATURE_DIM) != FEATURE_DIM:
        raise InputError(f"{path}: features are {cache.attrs['feature_dim']}-d, expected {FEATURE_DIM}")
    classes = cache.classes
    for split, labels in cache.labels.items():
        if len(labels) == 0:
            raise InputError(f"{path}: the {split} split is empty")
        if labels.min() < 0 or labels.max() >= len(classes):
            raise InputError(f"{path}: {split} labels are outside 0..{len(classes) - 1} ({len(classes)} classes)")
    tensors = [torch.from_numpy(a).to(device) for s in ("train", "test") for a in (cache.features[s], cache.labels[s])]
    return cache.attrs, classes, tensors


def default_out(cache: str | Path) -> Path:
    """`<cache stem>.head.pt` beside the cache."""
    return Path(cache).with_suffix(".head.pt")


def make_optimizer(linear: nn.Linear, opts: HeadOptions) -> torch.optim.Optimizer:
    """SGD (nesterov) or AdamW; weight decay on the weight only, like the L-BFGS objective."""
    groups = [{"params": [linear.weight], "weight_decay": opts.weight_decay}, {"params": [linear.bias], "weight_decay": 0.0}]
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=opts.lr)


def sgd_epoch(linear: nn.Linear, optimizer: torch.optim.Optimizer, schedule, x: torch.Tensor, y: torch.Tensor,
              opts: HeadOptions, generator: torch.Generator) -> tuple[float, float]:
    """One shuffled pass in mini-batches; returns the mean training loss and accuracy over its batches."""
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for idx in torch.randperm(len(y), generator=generator, device=x.device).split(opts.batch_size):
        inputs, target = x[idx], y[idx]
        logits = linear(inputs)
        loss = F.cross_entropy(logits, target, label_smoothing=opts.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach() * len(target)
        correct += (logits.argmax(1) == target).sum()
    return loss_sum.item() / len(y), correct.item() / len(y)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay from lr to 0."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))


def epoch_runner(linear: nn.Linear, opts: HeadOptions, x: torch.Tensor, y: torch.Tensor) -> Callable[[], tuple[float, float]]:
    """A function that trains one epoch and returns (train loss, train acc)."""
    if opts.optimizer == "lbfgs":
        lbfgs = make_lbfgs(linear)

        def lbfgs_run() -> tuple[float, float]:
            lbfgs_epoch(lbfgs, linear, x, y, opts.weight_decay, opts.label_smoothing)
            return evaluate(linear, x, y)

        return lbfgs_run
    optimizer = make_optimizer(linear, opts)
    schedule = cosine_schedule(optimizer, opts.epochs * math.ceil(len(y) / opts.batch_size))
    generator = torch.Generator(device=x.device).manual_seed(opts.seed)
    return lambda: sgd_epoch(linear, optimizer, schedule, x, y, opts, generator)


def train_head(opts: HeadOptions, log: Callable[[str], None] = print) -> HeadResult:
    """Train the head on the cache's train split, validating on its test split every epoch, and save it."""
    check_options(opts)
    device = resolve_device(opts.device)
    attrs, classes, tensors = load_features(opts.cache, device)
    out = Path(opts.out) if opts.out else default_out(opts.cache)
    start = time.perf_counter()
    linear, stats, history = fit_head(*tensors, len(classes), opts, log)
    seconds = time.perf_counter() - start
    save_head(out, linear, stats, classes, attrs, opts)
    return HeadResult(out, seconds, str(device), history)


def fit_head(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             num_classes: int, opts: HeadOptions, log: Callable[[str], None] = print) -> tuple[nn.Linear, tuple | None, list[dict]]:
    """The training loop on tensors: returns the linear layer, the standardisation stats and the history."""
    seed_everything(opts.seed)
    stats = feature_stats(train_x) if opts.standardize else None
    if stats is not None:
        train_x, test_x = (train_x - stats[0]) / stats[1], (test_x - stats[0]) / stats[1]
    linear = zero_linear(num_classes, train_x.device)
    run_epoch, history = epoch_runner(linear, opts, train_x, train_y), []
    for epoch in range(opts.epochs):
        epoch_start = time.perf_counter()
        train_loss, train_acc = run_epoch()
        valid_loss, valid_acc = evaluate(linear, test_x, test_y)
        seconds = time.perf_counter() - epoch_start
        history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                        "valid_loss": valid_loss, "valid_acc": valid_acc, "seconds": round(seconds, 4)})
        log(epoch_line(epoch, train_loss, train_acc, valid_loss, valid_acc, seconds))
    return linear, stats, history


def save_head(out: Path, linear: nn.Linear, stats: tuple[torch.Tensor, torch.Tensor] | None, classes: list[str],
              attrs: dict, opts: HeadOptions) -> None:
    atomic_torch_save({
        "format": HEAD_FORMAT,
        "state_dict": {k: v.cpu() for k, v in linear.state_dict().items()},
        "classes": list(classes),
        "standardize": None if stats is None else {"mean": stats[0].cpu(), "std": stats[1].cpu()},
        "cache_attrs": {k: attrs[k] for k in CACHE_ATTRS if k in attrs},
        "options": asdict(opts),
    }, out)


def load_head(path: str | Path) -> tuple[nn.Module, list[str], dict]:
    """A saved head as (CPU module mapping raw 512-d features to logits, classes, cache attrs)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"head file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"unreadable head file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != HEAD_FORMAT:
        raise InputError(f"{path} is not a fastfeat head (made by fastfeat train-head)")
    linear = nn.Linear(FEATURE_DIM, len(state["classes"]))
    try:
        linear.load_state_dict(state["state_dict"])
    except RuntimeError:
        raise InputError(f"{path}: the head's weights do not fit a {FEATURE_DIM}->{len(state['classes'])} layer") from None
    stats = state["standardize"]
    head = make_head(linear, None if stats is None else (stats["mean"], stats["std"]))
    return head.eval(), list(state["classes"]), dict(state["cache_attrs"])


def check_head_matches(head_attrs: dict, backbone_attrs: dict) -> None:
    """Refuse a head trained on features of another backbone, weights or preprocessing."""
    differ = [k for k in MATCH_ATTRS if _plain(head_attrs.get(k)) != _plain(backbone_attrs.get(k))]
    if differ:
        details = ", ".join(f"{k} {head_attrs.get(k)!r} vs {backbone_attrs.get(k)!r}" for k in differ)
        raise InputError(f"the head was trained on features of another backbone or preprocessing ({details})")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
