"""`fastfeat knn`: the weighted k-nearest-neighbour classifier of the DINO and DINOv2 evaluations.

Features are L2-normalised; a query's neighbours are the train rows of highest cosine similarity,
each voting for its class with weight exp(similarity / T); the class with the most weight wins.
(DINOv2 takes a softmax over the top max(k) similarities instead: the same weights divided by one
number per query, so the same predictions.) Every k is read off one top-max(k) search, whose
neighbours are sorted: the first k of them are the k nearest.

The search runs on the device in blocks of queries x train rows, one matmul and one `torch.topk`
per block, merged into a running top-k when train is split, so at most `SIMILARITY_BYTES` of
similarities exist at a time however large the splits are.

Protocol: accuracy for every k on a validation split held out of train (stratified, `val_fraction`
of every class, drawn with `seed`; its neighbours are the other train rows), and on test (its
neighbours: every train row, as in DINOv2).
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from .errors import InputError
from .evaluation import classification_report
from .head import load_features, own_val_split, validation_plan
from .runtime import resolve_device
from .settings import SIMILARITY_BYTES, KnnOptions
from .validation import ValidationPlan
from .views import load_views

MIN_QUERY_ROWS = 64  # train is split into blocks only when a block of this many queries would not fit


@dataclass
class KnnResult:
    """Accuracy per k on validation (empty without one) and test, the rows used, seconds of search."""

    k: tuple[int, ...]
    val: dict[int, float]
    test: dict[int, float]
    rows: dict[str, int]
    seconds: float
    device: str
    options: dict = field(default_factory=dict)
    tta: bool = False
    plan: ValidationPlan = field(default_factory=ValidationPlan)  # kind "test": no validation
    reports: dict = field(default_factory=dict)  # "test" (and "val"): classification_report at the best k

    @property
    def validation(self) -> str:
        """What validated: "holdout" (rows of train), "val" (the cache's own val split) or "test" (none)."""
        return self.plan.kind

    @property
    def best_k(self) -> int:
        """The k of the best validation accuracy (the smallest on a tie); without validation, of test."""
        return best_k(self.k, self.val or self.test)

    def metrics(self) -> dict:
        return {
            "command": "knn",
            "k": list(self.k),
            "val": {**self.reports.get("val", {}), "per_k": {str(k): acc for k, acc in self.val.items()}},
            "test": {**self.reports["test"], "per_k": {str(k): acc for k, acc in self.test.items()}},
            "validation": self.validation,
            "best_k": self.best_k,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "tta": "flip" if self.tta else "none",
            "options": self.options,
        }

    def table(self) -> list[str]:
        lines = [f"{'k':>5} {'val acc':>8} {'test acc':>9}"]
        for k in self.k:
            val = f"{self.val[k]:.4f}" if k in self.val else "-"
            lines.append(f"{k:>5} {val:>8} {self.test[k]:>9.4f}")
        return lines

    def summary(self) -> str:
        best = self.best_k
        chosen = f"val acc {self.val[best]:.4f}, " if self.val else ""
        split = (f"{self.rows['neighbours_val']} train rows for {self.rows['val']} validation queries, "
                 f"{self.rows['neighbours_test']} for {self.rows['test']} test queries; best k {best} by validation"
                 if self.val else f"{self.rows['neighbours_test']} train rows for {self.rows['test']} test queries, "
                                  f"no validation; best k {best} on test")
        return (f"knn in {self.seconds:.2f} s on {self.device} (T {self.options['temperature']:g}"
                f"{', test-time flip' if self.tta else ''}): "
                f"{split}: {chosen}test acc {self.test[best]:.4f}")


def check_options(opts: KnnOptions) -> KnnOptions:
    """`opts` with `k` as sorted distinct ints, or a one-line InputError for values no search can use."""
    return replace(opts, k=tuple(sorted(set(opts.k))))


def knn_evaluate(opts: KnnOptions) -> KnnResult:
    """kNN accuracy per k on a validation split of train and on test (see the module's docstring)."""
    opts = check_options(opts)
    device = resolve_device(opts.device)
    _, classes, (train_x, train_y, test_x, test_y) = load_features(opts.cache, device)
    plan = validation_plan(opts.cache, opts.val_fraction, opts.seed)
    own_val = own_val_split(opts.cache, device) if plan.kind == "val" else None
    views = load_views(opts.cache, device, "center-only", opts.tta, plan.kind)
    ks = opts.k
    kept, held = plan.split(train_y.cpu().numpy()) or (None, None)
    if kept is not None:
        check_k(ks, len(kept), f"the {len(kept)} train rows outside validation (--val-fraction {opts.val_fraction:g})")
    check_k(ks, len(train_y), f"the {len(train_y)} train rows of {opts.cache}")

    start = time.perf_counter()
    train_x = F.normalize(train_x, dim=1)
    val: dict[int, float] = {}
    val_scores: dict[int, torch.Tensor] = {}
    if held is not None:
        kept_t, held_t = (torch.from_numpy(rows).to(device) for rows in (kept, held))
        val_y = train_y[held_t]
        val_scores = knn_scores(train_x[kept_t], train_y[kept_t], train_x[held_t], ks, opts.temperature, len(classes),
                                opts.batch_size, flipped=normalized_flips(views.flips.get("train"), views.tta, held_t))
    elif own_val is not None:  # the dataset's own val split: every train row is a neighbour, as for test
        val_y = own_val[1]
        val_scores = knn_scores(train_x, train_y, F.normalize(own_val[0], dim=1), ks, opts.temperature, len(classes),
                                opts.batch_size, flipped=normalized_flips(views.flips.get("val"), views.tta))
    if val_scores:
        val = accuracies(val_scores, val_y)
    test_scores = knn_scores(train_x, train_y, F.normalize(test_x, dim=1), ks, opts.temperature, len(classes),
                             opts.batch_size, flipped=normalized_flips(views.flips.get("test"), views.tta))
    test = accuracies(test_scores, test_y)
    best = best_k(ks, val or test)
    reports = {"test": classification_report(test_scores[best], test_y)}
    if val_scores:
        reports["val"] = classification_report(val_scores[best], val_y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    val_rows = len(held) if held is not None else len(own_val[1]) if own_val is not None else 0
    rows = {"train": len(train_y), "val": val_rows, "test": len(test_y),
            "neighbours_val": len(kept) if kept is not None else len(train_y) if val_rows else 0,
            "neighbours_test": len(train_y)}
    return KnnResult(ks, val, test, rows, seconds, str(device), {**asdict(opts), "k": list(ks)}, views.tta,
                     plan, reports)


def normalized_flips(flips: torch.Tensor | None, tta: bool, rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """The L2-normalised flipped queries (of `rows`) under TTA, else None."""
    if not tta:
        return None
    return F.normalize((flips if rows is None else flips[rows]).float(), dim=1)


def check_k(ks: Iterable[int], rows: int, what: str) -> None:
    too_many = [k for k in ks if k > rows]
    if too_many:
        raise InputError(f"--k {max(too_many)} is more neighbours than {what}")


def accuracies(scores: dict[int, torch.Tensor], labels: torch.Tensor) -> dict[int, float]:
    return {k: (s.argmax(1) == labels).sum().item() / len(labels) for k, s in scores.items()}


def best_k(ks: Iterable[int], accuracy: dict[int, float]) -> int:
    """The k of the best accuracy (the smallest on a tie)."""
    return max(ks, key=lambda k: (accuracy[k], -k))


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, queries: torch.Tensor, ks: Iterable[int],
                temperature: float, num_classes: int, query_rows: int | None = None, train_rows: int | None = None,
                budget_bytes: int = SIMILARITY_BYTES, flipped: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """The predicted class of every query for every k: {k: (Q,) int64} (the argmax of `knn_scores`)."""
    scores = knn_scores(train_x, train_y, queries, ks, temperature, num_classes, query_rows, train_rows,
                        budget_bytes, flipped)
    return {k: score.argmax(1) for k, score in scores.items()}


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, queries: torch.Tensor, ks: Iterable[int],
               temperature: float, num_classes: int, query_rows: int | None = None, train_rows: int | None = None,
               budget_bytes: int = SIMILARITY_BYTES, flipped: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Every query's class vote shares for every k: {k: (Q, C) float32}, each row summing to 1 (DINOv2's
    softmax probabilities over the k neighbours).

    `train_x` and `queries` L2-normalised, on one device. Queries are taken `query_rows` at a time and
    train `train_rows` at a time (defaults: blocks of at most `budget_bytes` of float32 similarities).
    With `flipped` (the queries' flipped views, normalised), the mean of its two views' vote shares."""
    ks = sorted(set(ks))
    max_k = ks[-1]
    if not 1 <= ks[0] <= max_k <= len(train_x):
        raise InputError(f"k must be between 1 and the {len(train_x)} neighbour rows, got {ks}")
    query_rows, train_rows = block_sizes(len(queries), len(train_x), query_rows, train_rows, budget_bytes)
    buffer = queries.new_empty(query_rows * train_rows, dtype=torch.float32)
    out = {k: torch.empty(len(queries), num_classes, dtype=torch.float32, device=queries.device) for k in ks}

    def votes(block: torch.Tensor) -> list[torch.Tensor]:
        sims, idx = top_neighbours(block.float(), train_x, max_k, train_rows, buffer)
        return [shares(v) for v in cumulative_votes(sims, train_y[idx], ks, temperature, num_classes)]

    for start in range(0, len(queries), query_rows):
        stop = min(start + query_rows, len(queries))
        scores = votes(queries[start:stop])
        if flipped is not None:
            scores = [(a + b) / 2 for a, b in zip(scores, votes(flipped[start:stop]))]
        for k, score in zip(ks, scores):
            out[k][start:stop] = score
    return out


def shares(votes: torch.Tensor) -> torch.Tensor:
    """Each query's class votes as fractions of its total."""
    return votes / votes.sum(1, keepdim=True)


def block_sizes(queries: int, train: int, query_rows: int | None, train_rows: int | None,
                budget_bytes: int = SIMILARITY_BYTES) -> tuple[int, int]:
    """(queries, train rows) per block: all of train unless MIN_QUERY_ROWS queries against it would
    exceed the budget, then as many queries as fit (or `query_rows`, with train split to fit)."""
    cells = max(1, budget_bytes // 4)
    if train_rows is None:
        if query_rows is not None:
            train_rows = cells // query_rows
        else:
            train_rows = train if train * MIN_QUERY_ROWS <= cells else cells // MIN_QUERY_ROWS
    train_rows = max(1, min(train_rows, train))
    if query_rows is None:
        query_rows = cells // train_rows
    return max(1, min(query_rows, queries)), train_rows


def top_neighbours(queries: torch.Tensor, train_x: torch.Tensor, k: int, train_rows: int | None = None,
                   buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, train row indices), both (Q, k), of each query's k most similar train rows, most
    similar first. Train is searched `train_rows` at a time, each block's top-k merged into a running one.
    `buffer` (at least Q x train_rows float32 cells) is reused for the similarity blocks."""
    train_rows = train_rows or len(train_x)
    best_sims = best_idx = None
    for offset in range(0, len(train_x), train_rows):
        part = train_x[offset : offset + train_rows]
        cells = len(queries) * len(part)
        out = None if buffer is None else buffer[:cells].view(len(queries), len(part))
        sims = torch.mm(queries, part.T, out=out) if out is not None else queries @ part.T
        sims, idx = sims.topk(min(k, len(part)), dim=1)
        idx += offset
        if best_sims is not None:  # merge with the best so far
            sims, order = torch.cat([best_sims, sims], 1).topk(min(k, best_sims.shape[1] + sims.shape[1]), dim=1)
            idx = torch.cat([best_idx, idx], 1).gather(1, order)
        best_sims, best_idx = sims, idx
    return best_sims, best_idx


def cumulative_votes(sims: torch.Tensor, labels: torch.Tensor, ks: list[int], temperature: float,
                     num_classes: int) -> list[torch.Tensor]:
    """Each k's (Q, C) class votes from the sorted neighbours' similarities and labels: the sum of
    exp(sim / T) over the first k neighbours of each class. Weights are taken relative to each query's
    nearest neighbour, exp((sim - sim_1) / T): one factor per query, so the same argmax, and no
    overflow at small T."""
    weights = torch.exp((sims - sims[:, :1]) / temperature)
    votes = sims.new_zeros(len(sims), num_classes)
    out, done = [], 0
    for k in ks:
        votes.scatter_add_(1, labels[:, done:k], weights[:, done:k])
        out.append(votes.clone())
        done = k
    return out
