"""`fastfeat train-head`: the run around a linear head fitted from a feature cache, in seconds.

The cache is read once into float32 tensors on the device (or, when the features do not fit
`--memory-budget`, train stays in the file and is streamed in blocks: `rows.StreamedRows`, test and
validation in memory); a validation split is set aside; one head
(`linear.py`: sgd, adamw or lbfgs) or a batched grid of them (`sweep.py`, `--sweep`) is fitted; the test
split is evaluated once with the final head; the head is saved and the reports written.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import evaluation
from .budget import StreamPlan
from .cache_file import BlockReader, cached_splits, check_complete, read_cache, split_files, view_names
from .errors import InputError
from .evaluation import classification_report
from .linear import LBFGS_EVALS_PER_EPOCH, evaluated, fit_head, refit_head, with_defaults
from .model_files import LinearHead, save_head
from .outputs import OutputLock, check_output, check_reports
from .plots import require_matplotlib
from .rows import StreamedRows
from .runtime import resolve_device
from .settings import HeadOptions
from .spec import FeatureSpec
from .sweep import sweep_fit, sweep_grid
from .validation import ValidationPlan
from .views import HeadViews, ViewChoices, ViewSampler, flip_index, load_views


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
    plan: ValidationPlan = field(default_factory=ValidationPlan)
    test: dict = field(default_factory=dict)
    sweep: dict | None = None  # --sweep: the grid, its validation accuracies and the chosen setting
    views: dict = field(default_factory=dict)  # the views policy, each train view's rows read, the TTA

    @property
    def validation(self) -> str:
        """What validated: "holdout" (rows held out of train), "val" (the cache's val split) or "test"."""
        return self.plan.kind

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
    lines validate on test, as the original recipe did. `--sweep` trains its grid instead (`fit_sweep`).
    Its outputs are checked, and the head's file locked, before the work."""
    check_options(opts)
    out = Path(opts.out) if opts.out else default_out(opts.cache)
    check_output(out, "--out")
    check_reports(opts.predictions, opts.plot)
    with OutputLock(out):
        return run(opts, log, fit_sweep if opts.sweep else fit_single)


def train_sweep(opts: HeadOptions, log: Callable[[str], None] = print) -> HeadResult:
    """`--sweep`: the grid trained at once on train less the holdout, the best head chosen on the holdout,
    refit on all of train (unless --no-refit), test evaluated once with the chosen head, saved as usual."""
    return train_head(replace(opts, sweep=True), log)


@dataclass
class HeadData:
    """A run's tensors on its device: all of train, the rows that fit and those that validate (as
    evaluation takes them), test, the cache's views and the sampler of the fit rows' views. A streamed
    train's `train_x` and `fit_x` are its rows in the file (their labels in memory)."""

    classes: list[str]
    train_x: torch.Tensor | StreamedRows
    train_y: torch.Tensor
    fit_x: torch.Tensor | StreamedRows
    fit_y: torch.Tensor
    val_x: torch.Tensor | StreamedRows  # held-out rows over their budget share stay in the file
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    views: HeadViews
    sampler: ViewSampler | ViewChoices | None


@dataclass
class Fitted:
    """What a fitter hands the run: the head to test and save, its history, the options it was trained
    with (defaults or the sweep's choice filled in), the sampler that trained it and the sweep's grid."""

    head: LinearHead
    history: list[dict]
    options: HeadOptions
    sampler: ViewSampler | None
    sweep: dict | None = None


Fitter = Callable[[HeadOptions, HeadData, Callable[[str], None]], Fitted]


def run(opts: HeadOptions, log: Callable[[str], None], fit: Fitter) -> HeadResult:
    """The run around a fitter: load the cache, split off validation, fit (timed), test once, save, report."""
    out = Path(opts.out) if opts.out else default_out(opts.cache)
    if out.resolve() == Path(opts.cache).resolve():
        raise InputError(f"--out {out} is the cache itself: choose another file")
    device = resolve_device(opts.device)
    check_complete(opts.cache)
    plan = validation_plan(opts.cache, opts.val_fraction, opts.seed)
    stream = StreamPlan.for_splits(opts.cache, ("train", "val", "test"), opts.memory_budget, device,
                                   views=opts.views_policy == "sample" or opts.tta is not False,
                                   holdout=plan.kind == "holdout")
    if stream.streams:
        log(stream.describe(stream_passes(opts)))
        spec, data = streamed_data(opts, device, plan, stream, log)
    else:
        spec, data = in_memory_data(opts, device, plan)
    classes, views, test_x, test_y = data.classes, data.views, data.test_x, data.test_y
    start = time.perf_counter()
    fitted = fit(opts, data, log)
    seconds = time.perf_counter() - start
    model, test_in = evaluated(fitted.head, views.tta), views.evaluation_input(test_x, views.flips.get("test"))
    test = test_report(model, test_in, test_y)
    options = asdict(fitted.options)
    save_head(out, fitted.head, classes, spec, options, opts.standardize)
    result = HeadResult(out, seconds, str(device), options, fitted.history, plan, test, fitted.sweep,
                        views.report(fitted.sampler))
    write_reports(opts, result, model, test_in, test_y, classes)
    return result


def in_memory_data(opts: HeadOptions, device: torch.device, plan: ValidationPlan) -> tuple[FeatureSpec, HeadData]:
    """Every split read whole onto the device, validation split off as `plan` says."""
    spec, classes, (train_x, train_y, test_x, test_y) = load_features(opts.cache, device)
    fit_x, fit_y, val_x, val_y, rows = validation_split(plan, opts.cache, train_x, train_y, test_x, test_y)
    views, sampler, val_x = with_views(opts, device, plan, rows, fit_x, val_x)
    return spec, HeadData(classes, train_x, train_y, fit_x, fit_y, val_x, val_y, test_x, test_y, views, sampler)


def streamed_data(opts: HeadOptions, device: torch.device, plan: ValidationPlan, stream: StreamPlan,
                  log: Callable[[str], None]) -> tuple[FeatureSpec, HeadData]:
    """Train left in the file, to be streamed in blocks (with its views); test and validation in memory,
    but for held-out rows over their share of the budget, which are streamed too. One pass over train
    computes the fit rows' statistics and gathers the held-out rows it keeps (never trained on)."""
    spec, classes, (test_x, test_y) = load_features(opts.cache, device, ("test",))
    views = load_views(opts.cache, device, opts.views_policy, opts.tta, plan.kind, streamed=True)
    flip = flip_index(view_names(opts.cache).get("train", [])) if views.tta and plan.kind == "holdout" else None
    reader = BlockReader(opts.cache, "train", stream.block_rows, device, views=bool(views.names))
    labels = reader.labels()
    check_labels(opts.cache, "train", labels, classes)
    rows = plan.split(labels)

    def streamed(keep: np.ndarray | None) -> StreamedRows:
        count = len(labels) if keep is None else len(keep)
        return StreamedRows(reader, keep, labels, ViewChoices(count, views.names, opts.seed, device)
                            if views.names else None)

    train, fit = streamed(None), streamed(rows[0] if rows else None)
    held_bytes = 0 if rows is None else len(rows[1]) * reader.dim * 4 * (2 if flip is not None else 1)
    if rows is not None and stream.holds_in_memory(held_bytes):
        held_x, held_flips = fit.scan(rows[1], flip)
        val_x, val_y = views.evaluation_input(held_x, held_flips), torch.from_numpy(labels[rows[1]]).to(device)
    elif rows is not None:
        val_x = StreamedRows(reader if flip is None else reader.with_views(), rows[1], labels, flip=flip)
        val_y = val_x.y
        log(f"validation: {len(val_y)} held-out rows ({held_bytes / 2**20:.0f} MiB) over a quarter of the budget, "
            "read from the cache at every validation")
    else:
        val_x, val_y = own_val_split(opts.cache, device) if plan.kind == "val" else (test_x, test_y)
        val_x = views.evaluation_input(val_x, views.flips.get(plan.kind))
    return spec, HeadData(classes, train, train.y, fit, fit.y, val_x, val_y, test_x, test_y, views, fit.sampler)


def stream_passes(opts: HeadOptions) -> str:
    """How many times a streamed run reads train: a first pass (statistics, holdout), then every epoch
    once (an L-BFGS epoch once per loss evaluation, at most LBFGS_EVALS_PER_EPOCH), and a sweep's refit again."""
    per_epoch = LBFGS_EVALS_PER_EPOCH if opts.optimizer == "lbfgs" else 1
    passes = (1 + opts.epochs * per_epoch) * (2 if opts.sweep and opts.refit else 1)
    return f"{'up to ' if opts.optimizer == 'lbfgs' else ''}{passes}"


def fit_single(opts: HeadOptions, data: HeadData, log: Callable[[str], None]) -> Fitted:
    """One head (`opts.optimizer`) on the fit rows, validated every epoch."""
    opts = with_defaults(opts, len(data.fit_y))
    head, history = fit_head(data.fit_x, data.fit_y, data.val_x, data.val_y, len(data.classes), opts, log,
                             data.sampler, data.views.tta)
    return Fitted(head, history, opts, data.sampler)


def fit_sweep(opts: HeadOptions, data: HeadData, log: Callable[[str], None]) -> Fitted:
    """The grid trained at once on the fit rows, the best head chosen on validation, refit on all of train
    (unless --no-refit)."""
    lrs, wds = sweep_grid(opts, len(data.fit_y))
    log(f"sweep: {len(lrs) * len(wds)} sgd heads, {len(data.fit_y)} fit rows, {len(data.val_y)} validation rows; "
        f"lrs {', '.join(f'{v:g}' for v in lrs)}; weight decays {', '.join(f'{v:.3g}' for v in wds)}")
    start = time.perf_counter()
    sweep = sweep_fit(data.fit_x, data.fit_y, data.val_x, data.val_y, len(data.classes), lrs, wds, opts, log,
                      data.sampler)
    sweep_seconds = time.perf_counter() - start
    best = sweep.best()
    best_lr, best_wd = lrs[best // len(wds)], wds[best % len(wds)]
    chosen = replace(opts, lr=best_lr, weight_decay=best_wd, lrs=lrs, weight_decays=wds)
    log(f"sweep: best lr {best_lr:g}, weight decay {best_wd:.3g}: valid acc {sweep.val_acc[best]:.4f} "
        f"({sweep_seconds:.2f} s)")
    grid = {"lrs": list(lrs), "weight_decays": list(wds), "val_acc": sweep.grid(),
            "best": {"lr": best_lr, "weight_decay": best_wd, "val_acc": sweep.val_acc[best]},
            "refit": opts.refit, "seconds": round(sweep_seconds, 3)}
    if not opts.refit:
        return Fitted(sweep.head(best), [], chosen, data.sampler, grid)
    sampler = data.train_x.sampler if isinstance(data.train_x, StreamedRows) else data.views.sampler(
        data.train_x, None, opts.seed)
    head, history = refit_head(data.train_x, data.train_y, len(data.classes), chosen, log, sampler)
    return Fitted(head, history, chosen, sampler, grid)


def validation_plan(cache: str | Path, fraction: float, seed: int) -> ValidationPlan:
    """Which rows of `cache` validate at --val-fraction `fraction` (its own val split first)."""
    return ValidationPlan.choose("val" in cached_splits(cache), fraction, seed)


def validation_split(plan: ValidationPlan, cache: str | Path, train_x: torch.Tensor, train_y: torch.Tensor,
                     test_x: torch.Tensor, test_y: torch.Tensor) -> tuple:
    """(fit_x, fit_y, val_x, val_y, rows) as `plan` says: the cache's own val split (all of train fits), a
    holdout of train (`rows`: its (fit, validation) train rows; None otherwise), or test."""
    if plan.kind == "val":
        return train_x, train_y, *own_val_split(cache, train_x.device), None
    rows = holdout_rows(plan, train_y)
    if rows is None:
        return train_x, train_y, test_x, test_y, None
    fit, val = rows
    return train_x[fit], train_y[fit], train_x[val], train_y[val], rows


def holdout_rows(plan: ValidationPlan, train_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The plan's (fit, validation) train rows on train_y's device; None when all of train fits."""
    rows = plan.split(train_y.cpu().numpy())
    return None if rows is None else tuple(torch.from_numpy(r).to(train_y.device) for r in rows)


def own_val_split(cache: str | Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The features and labels of the cache's own val split, if it has one."""
    if "val" not in cached_splits(cache):
        return None
    data = read_cache(cache, ("val",))
    return torch.from_numpy(data.features["val"]).to(device), torch.from_numpy(data.labels["val"]).to(device)


def with_views(opts: HeadOptions, device: torch.device, plan: ValidationPlan, rows: tuple | None,
               fit_x: torch.Tensor, val_x: torch.Tensor) -> tuple[HeadViews, ViewSampler | None, torch.Tensor]:
    """The cache's views as `opts` use them: the sampler of the fit rows' views, and the validation rows
    (held-out train `rows`, the val split, or test) as evaluation takes them (with their flips under TTA)."""
    views = load_views(opts.cache, device, opts.views_policy, opts.tta, plan.kind)
    if rows is None:
        return views, views.sampler(fit_x, None, opts.seed), views.evaluation_input(val_x, views.flips.get(plan.kind))
    fit, val = rows
    return views, views.sampler(fit_x, fit, opts.seed), views.evaluation_input(val_x, views.flips.get("train"), val)


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


def check_options(opts: HeadOptions) -> None:
    """One-line InputErrors for values no training could use (None lr and weight decay are fine)."""
    if opts.plot:
        require_matplotlib()
    for flag, values in (("--lrs", opts.lrs or ()), ("--weight-decays", opts.weight_decays or ())):
        if values and not opts.sweep:
            raise InputError(f"{flag} is the --sweep grid: add --sweep, or give one value with {flag[:-1]}")
    if opts.sweep:
        if opts.optimizer != "sgd":
            raise InputError(f"--sweep trains sgd heads only, not --optimizer {opts.optimizer}")
        if opts.lr is not None or opts.weight_decay is not None:
            raise InputError("--sweep tries the --lrs x --weight-decays grid: drop --lr and --weight-decay")
        if opts.val_fraction == 0:
            raise InputError("--sweep picks its head on a holdout of train: --val-fraction must be > 0 "
                             "(0 would choose it on test)")


def load_features(path: str | Path, device: torch.device, splits: tuple[str, ...] = ("train", "test"),
                  ) -> tuple[FeatureSpec, list[str], list[torch.Tensor]]:
    """A complete cache as (spec, classes, [train_x, train_y, test_x, test_y]) on `device` (of `splits`)."""
    cache = read_cache(path, splits)
    classes = cache.classes
    for split, labels in cache.labels.items():
        check_labels(path, split, labels, classes)
    tensors = [torch.from_numpy(a).to(device) for s in splits for a in (cache.features[s], cache.labels[s])]
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


def test_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The test split, evaluated once: its loss, top-1 (and top-5), mean per-class and per-class accuracy,
    and the confusion matrix."""
    with torch.no_grad():
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y).item(), **classification_report(logits, y)}
