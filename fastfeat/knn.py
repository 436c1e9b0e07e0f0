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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np

import torch
import torch.nn.functional as F

from .budget import HELD_SHARE, StreamPlan
from .cache_file import Block, BlockReader, read_cache, read_views
from .errors import InputError
from .evaluation import classification_report
from .head import check_labels, load_features, own_val_split, validation_plan
from .rows import row_mask
from .runtime import resolve_device
from .settings import SIMILARITY_BYTES, KnnOptions
from .validation import ValidationPlan
from .views import FLIP, flip_index, load_views, resolve_tta

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


def knn_evaluate(opts: KnnOptions, log: Callable[[str], None] = print) -> KnnResult:
    """kNN accuracy per k on a validation split of train and on test (see the module's docstring); train is
    streamed from the cache in blocks when the features do not fit `--memory-budget`."""
    opts = check_options(opts)
    device = resolve_device(opts.device)
    plan = validation_plan(opts.cache, opts.val_fraction, opts.seed)
    stream = StreamPlan.for_splits(opts.cache, ("train", "val", "test"), opts.memory_budget, device,
                                   holdout=plan.kind == "holdout")
    start = time.perf_counter()
    if stream.streams:
        log(stream.describe(passes=2 if plan.kind == "holdout" else 1))
        found = streamed_scores(opts, device, stream, plan, log)
    else:
        found = in_memory_scores(opts, device, plan)
    ks, (val_scores, val_y, test_scores, test_y, rows, tta) = opts.k, found
    val = accuracies(val_scores, val_y) if val_scores else {}
    test = accuracies(test_scores, test_y)
    best = best_k(ks, val or test)
    reports = {"test": classification_report(test_scores[best], test_y)}
    if val_scores:
        reports["val"] = classification_report(val_scores[best], val_y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return KnnResult(ks, val, test, rows, seconds, str(device), {**asdict(opts), "k": list(ks)}, tta,
                     plan, reports)


class Scores(NamedTuple):
    """What a search found: vote shares per k of validation (empty without one) and test, their labels,
    the rows used and whether queries were flip-averaged."""

    val: dict[int, torch.Tensor]
    val_y: torch.Tensor | None
    test: dict[int, torch.Tensor]
    test_y: torch.Tensor
    rows: dict[str, int]
    tta: bool


def in_memory_scores(opts: KnnOptions, device: torch.device, plan: ValidationPlan) -> Scores:
    """The search with every split on the device."""
    _, classes, (train_x, train_y, test_x, test_y) = load_features(opts.cache, device)
    own_val = own_val_split(opts.cache, device) if plan.kind == "val" else None
    views = load_views(opts.cache, device, "center-only", opts.tta, plan.kind)
    ks = opts.k
    kept, held = validation_rows(opts, train_y.cpu().numpy(), plan)
    train_x = F.normalize(train_x, dim=1)
    val_scores: dict[int, torch.Tensor] = {}
    val_y = None
    if held is not None:
        kept_t, held_t = (torch.from_numpy(rows).to(device) for rows in (kept, held))
        val_y = train_y[held_t]
        val_scores = knn_scores(train_x[kept_t], train_y[kept_t], train_x[held_t], ks, opts.temperature, len(classes),
                                opts.batch_size, flipped=normalized_flips(views.flips.get("train"), views.tta, held_t))
    elif own_val is not None:  # the dataset's own val split: every train row is a neighbour, as for test
        val_y = own_val[1]
        val_scores = knn_scores(train_x, train_y, F.normalize(own_val[0], dim=1), ks, opts.temperature, len(classes),
                                opts.batch_size, flipped=normalized_flips(views.flips.get("val"), views.tta))
    test_scores = knn_scores(train_x, train_y, F.normalize(test_x, dim=1), ks, opts.temperature, len(classes),
                             opts.batch_size, flipped=normalized_flips(views.flips.get("test"), views.tta))
    return Scores(val_scores, val_y, test_scores, test_y, row_counts(len(train_y), kept, held, val_y, test_y),
                  views.tta)


def validation_rows(opts: KnnOptions, train_y: np.ndarray, plan: ValidationPlan) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(kept, held-out) train rows of `plan`'s holdout, each sorted ((None, None) without one), with k checked
    against the neighbours each query set has."""
    check_k(opts.k, len(train_y), f"the {len(train_y)} train rows of {opts.cache}")
    rows = plan.split(train_y)
    if rows is None:
        return None, None
    kept, held = rows
    check_k(opts.k, len(kept), f"the {len(kept)} train rows outside validation (--val-fraction {opts.val_fraction:g})")
    return kept, held


def row_counts(train: int, kept: np.ndarray | None, held: np.ndarray | None, val_y: torch.Tensor | None,
               test_y: torch.Tensor) -> dict[str, int]:
    val_rows = 0 if val_y is None else len(val_y)
    return {"train": train, "val": val_rows, "test": len(test_y),
            "neighbours_val": len(kept) if kept is not None else train if val_rows else 0, "neighbours_test": train}


def streamed_scores(opts: KnnOptions, device: torch.device, stream: StreamPlan, plan: ValidationPlan,
                    log: Callable[[str], None]) -> Scores:
    """The search with train read block by block (queries in memory): each pass merges every block's top-k
    into each query's running one; held-out rows, the queries of a holdout, are gathered by a pass of their
    own, in groups that fit a quarter of the budget (each group then a search pass). The same neighbours as
    `in_memory_scores`, so the same answer."""
    reader = BlockReader(opts.cache, "train", stream.block_rows, device)
    labels = reader.labels()
    validation = plan.kind
    query_splits = ("test",) + (("val",) if validation == "val" else ())
    data = read_cache(opts.cache, query_splits)
    classes = data.classes
    check_labels(opts.cache, "train", labels, classes)
    train_y = torch.from_numpy(labels).to(device)
    flips = {s: views[:, flip_index(names)] for s, (views, names) in read_views(opts.cache, query_splits).items()
             if FLIP in names}
    with_views = BlockReader(opts.cache, "train", stream.block_rows, device, views=opts.tta is not False)
    train_flip = flip_index(with_views.view_names)
    validated = {"holdout": train_flip is not None, "val": "val" in flips, "test": True}[validation]
    tta = resolve_tta(opts.tta, "test" in flips and validated, opts.cache)
    kept, held = validation_rows(opts, labels, plan)
    queries = {s: queries_of(torch.from_numpy(data.features[s]).to(device),
                             torch.from_numpy(flips[s]).to(device) if tta else None) for s in query_splits}
    searches = [{s: [(q, None) for q in queries[s]] for s in queries}]
    if held is not None:
        groups = held_groups(held, stream, reader.dim, opts.k[-1], tta)
        if len(groups) > 1:
            log(f"kNN: {len(held)} held-out queries in {len(groups)} groups of up to {len(groups[0])}, each "
                "gathered and searched by a pass of its own (a quarter of the budget holds one)")
        allowed = ~row_mask(held, reader.rows, device)
        gathered = lambda group: queries_of(*gather_rows(with_views if tta else reader,  # noqa: E731
                                                         row_mask(group, reader.rows, device), train_flip if tta else None))
        searches[0]["val"] = [(q, allowed) for q in gathered(groups[0])]
        searches += [{"val": [(q, allowed) for q in gathered(group)]} for group in groups[1:]]
    by_split = split_shares(searches, reader, train_y, opts, len(classes))
    test_y = torch.from_numpy(data.labels["test"]).to(device)
    val_y = (train_y[torch.from_numpy(held).to(device)] if held is not None else
             torch.from_numpy(data.labels["val"]).to(device) if validation == "val" else None)
    return Scores(by_split.get("val", {}), val_y, by_split["test"], test_y,
                  row_counts(reader.rows, kept, held, val_y, test_y), tta)


# Under a tiny budget, a group still holds this many queries: each group costs two passes over train, and
# fewer queries would make the passes, not the memory, what bounds the run.
MIN_QUERY_GROUP = 32


def held_groups(held: np.ndarray, stream: StreamPlan, dim: int, k: int, tta: bool) -> list[np.ndarray]:
    """The held-out rows cut into groups whose queries (features, and a running top-k of similarities and
    rows; twice under TTA) fit the budget's share for them, of at least MIN_QUERY_GROUP."""
    per_query = (dim * 4 + k * 12) * (2 if tta else 1)
    rows = max(MIN_QUERY_GROUP, stream.budget // HELD_SHARE // per_query)
    return [held[at:at + rows] for at in range(0, len(held), rows)]


def split_shares(searches: list[dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]], reader: BlockReader,
                 train_y: torch.Tensor, opts: KnnOptions, num_classes: int) -> dict[str, dict[int, torch.Tensor]]:
    """Each split's vote shares per k: every search one pass over train for all its query sets (a split's
    sets: its queries and, under TTA, their flips, averaged; a split searched in groups, concatenated)."""
    parts: dict[str, list[list[torch.Tensor]]] = {}
    for search in searches:
        sets = [(s, item) for s in search for item in search[s]]
        found = streamed_neighbours(reader.blocks(), [item for _, item in sets], opts.k[-1])
        shares_of = {}
        for (s, _), (sims, idx) in zip(sets, found):
            shares_of.setdefault(s, []).append(neighbour_shares(sims, train_y[idx], opts.k, opts.temperature,
                                                                num_classes))
        for s, views in shares_of.items():  # average the views, per k
            parts.setdefault(s, []).append([sum(v[j] for v in views) / len(views) for j in range(len(opts.k))])
    return {s: {k: torch.cat([group[j] for group in groups]) for j, k in enumerate(opts.k)} for s, groups in parts.items()}


def queries_of(x: torch.Tensor, flips: torch.Tensor | None) -> list[torch.Tensor]:
    """A split's L2-normalised queries, and under TTA their flips: each a query set whose shares are averaged."""
    return [F.normalize(v.float(), dim=1) for v in (x, flips) if v is not None]


def gather_rows(reader: BlockReader, mask: torch.Tensor, flip: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The features (and flips, view `flip`) of the train rows `mask` marks, in file order, picked from each block."""
    features, flips = [], []
    for block in reader.blocks():
        local = block.local(mask)
        features.append(block.features[local])
        if flip is not None:
            flips.append(block.views[local, flip])
    return torch.cat(features), torch.cat(flips) if flip is not None else None


def streamed_neighbours(blocks: Iterable[Block], query_sets: list[tuple[torch.Tensor, torch.Tensor | None]],
                        k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each query set's (similarities, train rows), both (Q, k), of its k most similar train rows among those
    its mask allows (None: all), the blocks' top-k merged as they arrive."""
    best: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(query_sets)
    for block in blocks:
        x = F.normalize(block.features, dim=1)
        for i, (queries, allowed) in enumerate(query_sets):
            rows = None if allowed is None else block.local(allowed)
            part = x if rows is None else x[rows]
            if len(part) == 0:
                continue
            sims, idx = blocked_top(queries, part, k)
            idx = block.rows[idx if rows is None else rows[idx]]
            best[i] = (sims, idx) if best[i] is None else merge_top(*best[i], sims, idx, k)
    return best


def blocked_top(queries: torch.Tensor, train_x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_neighbours` of every query, queries taken as many at a time as keep the similarities in budget."""
    query_rows, train_rows = block_sizes(len(queries), len(train_x), None, None)
    buffer = queries.new_empty(query_rows * train_rows)
    found = [top_neighbours(queries[a:a + query_rows], train_x, k, train_rows, buffer)
             for a in range(0, len(queries), query_rows)]
    return torch.cat([s for s, _ in found]), torch.cat([i for _, i in found])


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
        return neighbour_shares(sims, train_y[idx], ks, temperature, num_classes)

    for start in range(0, len(queries), query_rows):
        stop = min(start + query_rows, len(queries))
        scores = votes(queries[start:stop])
        if flipped is not None:
            scores = [(a + b) / 2 for a, b in zip(scores, votes(flipped[start:stop]))]
        for k, score in zip(ks, scores):
            out[k][start:stop] = score
    return out


def neighbour_shares(sims: torch.Tensor, labels: torch.Tensor, ks: Iterable[int], temperature: float,
                     num_classes: int) -> list[torch.Tensor]:
    """Each k's (Q, C) vote shares from the sorted neighbours' similarities and labels."""
    return [shares(v) for v in cumulative_votes(sims, labels, sorted(ks), temperature, num_classes)]


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
        if best_sims is not None:
            sims, idx = merge_top(best_sims, best_idx, sims, idx, k)
        best_sims, best_idx = sims, idx
    return best_sims, best_idx


def merge_top(best_sims: torch.Tensor, best_idx: torch.Tensor, sims: torch.Tensor, idx: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of two (Q, k) candidate lists, most similar first."""
    sims, order = torch.cat([best_sims, sims], 1).topk(min(k, best_sims.shape[1] + sims.shape[1]), dim=1)
    return sims, torch.cat([best_idx, idx], 1).gather(1, order)


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
