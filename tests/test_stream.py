"""Features bigger than memory: the block reader (contiguous blocks, every row once, any block order),
the streamed kNN and train-head (every optimizer, the sweep, views, TTA) against the in-memory ones, and
what a streamed epoch reads (--memory-budget's parsing is the options' own: test_cli.py)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import run, separable, write_cache

import fastfeat.linear as linear_module
from fastfeat.budget import StreamPlan
from fastfeat.cache_file import MIN_PIECE_BYTES, PIECES_PER_BLOCK, Block, BlockReader, piece_rows
from fastfeat.errors import InputError
from fastfeat.head import HeadOptions, train_head
from fastfeat.knn import KnnOptions, knn_evaluate
from fastfeat.model_files import load_head
from fastfeat.options import parse_size
from fastfeat.rows import StreamedRows
from fastfeat.validation import ValidationPlan

TINY = "40KB"  # a 20th of the train features below: every command streams


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    train, test = separable(400, rng), separable(100, rng)
    views = {s: (["flip"], (x + rng.normal(0, 0.3, x.shape)).astype(np.float16)[:, None]) for s, (x, _) in
             (("train", train), ("test", test))}
    return write_cache(tmp_path / "c.h5", {"train": train, "test": test}, views=views)


def kept(block: Block) -> Block:
    """A copy of `block` that outlives the next one drawn (whose read reuses its memory)."""
    return Block(*(None if t is None else t.clone() for t in (block.rows, block.features, block.labels, block.views)))


@pytest.mark.parametrize("read_ahead", [True, False])
def test_blocks_are_contiguous_and_cover_every_row_once(cache, read_ahead):
    reader = BlockReader(cache, "train", 48, views=True)
    reader.read_ahead = read_ahead  # a thread reads the next block, or each is read when drawn
    assert reader.block_rows == 48 and reader.view_names == ["flip"]
    blocks = [kept(b) for b in reader.blocks()]
    assert [b.rows.tolist() for b in blocks] == [list(range(a, min(400, a + 48))) for a in range(0, 400, 48)]
    x, y = separable(400, np.random.default_rng(0))
    features = torch.cat([b.features for b in blocks])
    assert features.dtype == torch.float32 and torch.equal(features, torch.from_numpy(x.astype(np.float32)))
    assert torch.equal(torch.cat([b.labels for b in blocks]), torch.from_numpy(y))
    assert blocks[-1].views.shape == (400 - 8 * 48, 1, 512)


def test_a_gathered_block_concatenates_its_ranges(cache):
    reader = BlockReader(cache, "train", 48, views=True)
    x, y = separable(400, np.random.default_rng(0))
    groups = [[(390, 400), (0, 8), (200, 230)], [(57, 58)]]
    for block, ranges in zip(reader.gathered(groups), groups, strict=True):
        rows = np.concatenate([np.arange(a, b) for a, b in ranges])
        assert block.rows.tolist() == rows.tolist() and torch.equal(block.labels, torch.from_numpy(y[rows]))
        assert torch.equal(block.features, torch.from_numpy(x[rows].astype(np.float32)))
        assert block.views.shape == (len(rows), 1, 512) and block.views.dtype == torch.float32


def test_pieces_are_small_many_and_whole_chunks_where_a_chunk_fits():
    assert piece_rows(10240, 1024, 1024) * PIECES_PER_BLOCK == 10240  # as many pieces as allowed
    assert piece_rows(1024, 1024, 1024) * 1024 == piece_rows(1024, 1024, 2048) * 2048 == MIN_PIECE_BYTES
    assert piece_rows(10, 1024, 1024) == 10  # a block smaller than a minimal piece is one piece
    assert piece_rows(2**20, 1024, 1024) == 4096 and piece_rows(300_000, 1024, 1024) == 1024  # whole chunks


def test_a_non_finite_row_is_refused_by_its_file_row(tmp_path):
    rng = np.random.default_rng(0)
    x, y = separable(400, rng)
    x[300, 7] = np.inf
    cache = write_cache(tmp_path / "inf.h5", {"train": (x, y), "test": separable(50, rng)})
    with pytest.raises(InputError, match=r"train/features of a streamed block hold nan or inf in 1 row\(s\), "
                                         r"the first is row 300;"):
        list(BlockReader(cache, "train", 48).gathered([[(350, 400), (290, 310)]]))


def test_plan_streams_only_over_budget(cache):
    device = torch.device("cpu")
    assert not StreamPlan.for_splits(str(cache), ("train", "test"), 10**9, device).streams
    plan = StreamPlan.for_splits(str(cache), ("train", "test"), parse_size(TINY), device)
    assert plan.streams and 1 <= plan.block_rows < 400 and "blocks of" in plan.describe(2)


@pytest.mark.parametrize("val_fraction,tta", [(0.2, False), (0.0, False), (0.25, True), (0.0, True)])
def test_streamed_knn_is_the_in_memory_answer(cache, val_fraction, tta):
    opts = dict(cache=str(cache), k=(1, 5, 20), val_fraction=val_fraction, device="cpu", tta=tta)
    lines: list[str] = []
    whole = knn_evaluate(KnnOptions(**opts), log=lines.append)
    assert lines == []  # the data fit: the in-memory path, unchanged
    streamed = knn_evaluate(KnnOptions(**opts, memory_budget=TINY), log=lines.append)
    assert lines[0].startswith("streaming train") and all(line.startswith("kNN: ") for line in lines[1:]), lines
    assert streamed.val == whole.val and streamed.test == whole.test and streamed.rows == whole.rows
    assert streamed.tta == whole.tta == tta and streamed.reports == whole.reports


def test_info_shows_split_bytes(cache, capsys):
    code, out, _ = run(["info", str(cache), "--json"], capsys)
    splits = json.loads(out)["splits"]
    assert code == 0 and splits["train"]["bytes"] == 400 * 512 * 2 * 2 + 400 * 8  # features, flips, labels


HEAD_BUDGET = "1MB"  # under the 2 MB of train and test features: blocks of tens of rows, a few per epoch


def heads(cache, tmp_path, **extra):
    """The in-memory run (a budget that holds everything: no line, the default path) and the streamed one."""
    results, lines = [], []
    for budget in ("1GB", HEAD_BUDGET):
        opts = HeadOptions(cache=str(cache), out=str(tmp_path / f"{budget}.pt"), device="cpu", memory_budget=budget,
                           **{"epochs": 4, **extra})
        results.append((train_head(opts, log=lines.append), load_head(tmp_path / f"{budget}.pt")[0]))
        if budget == "1GB":
            assert not any(line.startswith("streaming") for line in lines)
    streaming = [line for line in lines if line.startswith("streaming train")]
    assert len(streaming) == 1 and "blocks of" in streaming[0] and "passes" in streaming[0], streaming
    return results


def test_a_budget_that_holds_everything_changes_nothing(cache, tmp_path):
    default = train_head(HeadOptions(cache=str(cache), out=str(tmp_path / "d.pt"), device="cpu", epochs=4),
                         log=lambda line: None)
    (whole, head), _ = heads(cache, tmp_path)
    strip = lambda history: [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]  # noqa: E731
    assert strip(whole.history) == strip(default.history) and whole.test == default.test
    assert torch.equal(head.fc.weight, load_head(tmp_path / "d.pt")[0].fc.weight)


def test_streamed_lbfgs_is_the_full_batch_fit(cache, tmp_path):
    """On the center crops the objective is fixed: the streamed fit is the in-memory one. With a view drawn
    per row each epoch it changes every epoch and L-BFGS's line searches amplify rounding, so there the
    losses and the test result are compared."""
    (tmp_path / "center").mkdir()
    (whole, whole_head), (streamed, streamed_head) = heads(cache, tmp_path / "center", optimizer="lbfgs",
                                                           views_policy="center-only")
    torch.testing.assert_close(streamed_head.mean, whole_head.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed_head.fc.weight, whole_head.fc.weight, rtol=1e-3, atol=1e-4)
    for a, b in zip(whole.history, streamed.history):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * a["train_loss"], (a, b)
    assert abs(whole.test["loss"] - streamed.test["loss"]) < 1e-4 and whole.test["top1"] == streamed.test["top1"]
    whole, streamed = (result for result, _ in heads(cache, tmp_path, optimizer="lbfgs"))
    assert abs(whole.test["loss"] - streamed.test["loss"]) < 0.05 * whole.test["loss"], (whole.test, streamed.test)
    assert whole.test["top1"] == streamed.test["top1"]


def test_the_streamed_lbfgs_objective_is_the_full_batch_one(cache):
    """One closure call of `lbfgs_epoch` at a fixed head: the loss and gradient over blocks against the
    whole-batch ones (and an independent float64 computation)."""
    from fastfeat.model_files import LinearHead
    from fastfeat.rows import TensorRows

    reader = BlockReader(cache, "train", 48)
    labels = reader.labels()
    x = torch.cat([block.features.clone() for block in reader.blocks()])
    head = LinearHead(512, 3, x.mean(0), x.std(0) + 1)
    torch.nn.init.normal_(head.fc.weight, std=0.1)

    class Once:  # an optimizer that evaluates the closure once
        def zero_grad(self):
            head.zero_grad()

        def step(self, closure):
            self.loss = closure().item()
            self.grad = head.fc.weight.grad.clone()

    found = []
    for rows in (TensorRows(x, torch.from_numpy(labels)), StreamedRows(reader, None, labels)):
        once = Once()
        linear_module.lbfgs_epoch(once, head, rows, weight_decay=0.01)
        found.append((once.loss, once.grad))
    (whole_loss, whole_grad), (streamed_loss, streamed_grad) = found
    logits = head.double()(x.double())
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)) + 0.005 * head.fc.weight.square().sum()
    assert abs(streamed_loss - whole_loss) <= 1e-6 * whole_loss and abs(streamed_loss - expected.item()) <= 1e-5
    torch.testing.assert_close(streamed_grad.double(), whole_grad.double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("extra", [{"optimizer": "sgd"}, {"optimizer": "adamw"}, {"tta": False},
                                   {"views_policy": "center-only"},
                                   {"sweep": True, "lrs": (0.05, 0.5), "weight_decays": (1e-3, 1e-1)}])
def test_streamed_heads_match_the_in_memory_ones(cache, tmp_path, extra):
    (whole, _), (streamed, _) = heads(cache, tmp_path, **extra)
    assert abs(whole.test["top1"] - streamed.test["top1"]) <= 0.003 and streamed.test["top1"] > 0.6  # chance: 1/3
    assert streamed.views == whole.views  # the same views read as often, the same TTA
    if "sweep" in extra:
        assert len(streamed.history) == 4 and abs(streamed.sweep["best"]["val_acc"] - whole.sweep["best"]["val_acc"]) <= 0.003
    else:
        assert abs(whole.best_valid_acc - streamed.best_valid_acc) <= 0.003 and len(streamed.history) == 4


@pytest.fixture
def numbered(tmp_path):
    """A cache whose last feature is each train row's number (exact in float16)."""
    rng = np.random.default_rng(1)
    (x, y), test = separable(400, rng), separable(100, rng)
    x[:, -1] = np.arange(400)
    return write_cache(tmp_path / "n.h5", {"train": (x, y), "test": test}), y


@pytest.mark.parametrize("extra", [{}, {"sweep": True, "lrs": (0.1,), "weight_decays": (1e-2,), "refit": False}])
def test_a_streamed_epoch_reads_every_fit_row_once_and_no_held_out_row(numbered, tmp_path, monkeypatch, extra):
    cache, y = numbered
    epochs, validated, real_shuffled, real_evaluate = [], [], StreamedRows.shuffled, linear_module.evaluate

    def recorded(self, batch_size, generator):
        batches = []
        epochs.append(batches)
        for x, labels in real_shuffled(self, batch_size, generator):
            batches.append(x[:, -1].long().tolist())
            yield x, labels

    monkeypatch.setattr(StreamedRows, "shuffled", recorded)
    monkeypatch.setattr(linear_module, "evaluate",
                        lambda m, x, labels: validated.append(x[:, -1].long().tolist()) or real_evaluate(m, x, labels))
    result = train_head(HeadOptions(cache=str(cache), out=str(tmp_path / "h.pt"), device="cpu", epochs=3,
                                    batch_size=64, memory_budget="300KB", val_fraction=0.25, **extra),
                        log=lambda line: None)
    held = set(ValidationPlan(fraction=0.25, seed=0).split(y)[1].tolist())
    assert 0 < len(held) < 400 and result.validation == "holdout"
    fit = sorted(set(range(400)) - held)
    assert len(epochs) == 3
    for batches in epochs:
        rows = [row for batch in batches for row in batch]
        assert sorted(rows) == fit  # every fit row exactly once, no held-out row
        assert [len(b) for b in batches[:-1]] == [64] * (len(batches) - 1) and len(batches) == -(-len(fit) // 64)
        assert rows != fit  # shuffled, not in file order
    assert epochs[0] != epochs[1]
    if not extra:  # the single head validates every epoch on the held-out rows (streamed: over 1/4 of 300KB), only them
        assert Counter(row for part in validated for row in part) == {row: 3 for row in held}


SORTED_ROWS, SORTED_CLASSES = 4000, 10


@pytest.fixture
def sorted_cache(tmp_path):
    """A train split sorted by label (as a folder dataset is cached: class by class) whose first two features
    give each row's number (exact in float16)."""
    y = np.repeat(np.arange(SORTED_CLASSES), SORTED_ROWS // SORTED_CLASSES)
    x = np.random.default_rng(2).normal(0, 1, (SORTED_ROWS, 512)).astype(np.float16)
    x[:, 0], x[:, 1] = np.arange(SORTED_ROWS) // 64, np.arange(SORTED_ROWS) % 64
    path = write_cache(tmp_path / "sorted.h5", {"train": (x, y), "test": (x[:10], y[:10])},
                       classes=[str(c) for c in range(SORTED_CLASSES)])
    return path, y


def streamed_epoch(rows: StreamedRows, labels: np.ndarray, batch_size: int, seed: int) -> list[torch.Tensor]:
    """One epoch of `rows.shuffled` as each batch's file rows (its labels checked against them)."""
    batches = []
    for x, y in rows.shuffled(batch_size, torch.Generator().manual_seed(seed)):
        batches.append((x[:, 0] * 64 + x[:, 1]).long())
        assert torch.equal(y, torch.from_numpy(labels)[batches[-1]])
    return batches


def test_a_streamed_batch_mixes_the_classes_of_a_class_sorted_file(sorted_cache):
    """Blocks of a quarter of the split: shuffling the blocks, then the rows inside each, would give batches
    of one or two classes; gathered blocks give nearly as many classes a batch as a full shuffle."""
    path, y = sorted_cache
    rows = StreamedRows(BlockReader(path, "train", SORTED_ROWS // 4), None, y)
    classes = lambda batches: np.mean([len(np.unique(y[b.numpy()])) for b in batches])  # noqa: E731
    full = classes(torch.randperm(SORTED_ROWS, generator=torch.Generator().manual_seed(0)).split(64))
    streamed = classes(streamed_epoch(rows, y, 64, 0))
    assert streamed >= 0.8 * full, (streamed, full)


@pytest.mark.parametrize("read_ahead", [True, False])
def test_a_streamed_epoch_is_every_kept_row_once_in_one_order_a_seed(sorted_cache, read_ahead):
    path, y = sorted_cache
    held = np.sort(np.random.default_rng(3).choice(SORTED_ROWS, 500, replace=False))
    keep = np.setdiff1d(np.arange(SORTED_ROWS), held)
    reader = BlockReader(path, "train", SORTED_ROWS // 4)
    reader.read_ahead = read_ahead
    rows = StreamedRows(reader, keep, y)
    batches = streamed_epoch(rows, y, 100, 0)
    order = torch.cat(batches)
    assert sorted(order.tolist()) == keep.tolist()  # every kept row once, no held-out row
    assert [len(b) for b in batches[:-1]] == [100] * (len(batches) - 1) and len(batches) == -(-len(keep) // 100)
    assert torch.equal(order, torch.cat(streamed_epoch(rows, y, 100, 0)))
    assert not torch.equal(order, torch.cat(streamed_epoch(rows, y, 100, 1)))


@pytest.mark.parametrize("extra", [{}, {"tta": False}, {"sweep": True, "lrs": (0.05, 0.5), "weight_decays": (1e-3, 1e-1)}])
def test_held_out_rows_over_their_budget_share_are_streamed_with_the_same_result(cache, tmp_path, extra):
    """100 held-out rows of 2 KB (with TTA their flips too) are over a quarter of a 300KB budget: read from the
    file at each validation, they validate as the in-memory rows do."""
    lines = []
    whole, streamed = (train_head(HeadOptions(cache=str(cache), out=str(tmp_path / f"{budget}.pt"), device="cpu",
                                              memory_budget=budget, epochs=4, val_fraction=0.25, **extra),
                                  log=lines.append) for budget in ("1GB", "300KB"))
    assert sum(line.startswith("validation: 100 held-out rows") for line in lines) == 1, lines
    assert abs(whole.test["top1"] - streamed.test["top1"]) <= 0.003 and streamed.views == whole.views
    if "sweep" in extra:
        assert abs(streamed.sweep["best"]["val_acc"] - whole.sweep["best"]["val_acc"]) <= 0.003
    else:
        assert [e["valid_acc"] for e in streamed.history] == pytest.approx([e["valid_acc"] for e in whole.history], abs=0.003)


def test_rows_read_from_their_bytes_equal_hdf5s_reads_and_filtered_data_goes_through_hdf5(tmp_path, monkeypatch):
    """The caches fastfeat writes are plain bytes on disk (read with preadv, chunk by chunk); pieces crossing
    chunk boundaries, whole chunks and the short last chunk read as h5py reads them; a compressed copy has
    no byte places and is read through h5py."""
    import h5py

    from fastfeat import cache_file

    monkeypatch.setattr(cache_file, "CHUNK_ROWS", 64)  # chunks of 64 rows, the last one of 16
    rng = np.random.default_rng(4)
    x, y = separable(400, rng)
    cache = write_cache(tmp_path / "chunked.h5", {"train": (x, y), "test": separable(50, rng)},
                        views={"train": (["flip"], x.astype(np.float16)[:, None] * -1)})
    groups = [[(0, 3), (60, 70), (390, 400)], [(5, 150)], [(399, 400), (200, 201)]]
    with h5py.File(cache, "r") as f:
        places = {name: cache_file._FileRows.of(f["train"][name], cache) for name in ("features", "views")}
        assert [place and place.chunk_rows for place in places.values()] == [64, 64]
        squeezed = tmp_path / "gzip.h5"
        with h5py.File(squeezed, "w") as g:
            g.create_dataset("x", data=f["train"]["features"][:], chunks=(64, 512), compression="gzip")
            assert cache_file._FileRows.of(g["x"], squeezed) is None
    reader = BlockReader(cache, "train", 200, views=True)
    by_bytes = [kept(b) for b in reader.gathered(groups)]
    monkeypatch.setattr(cache_file._FileRows, "of", classmethod(lambda cls, data, path: None))
    through_hdf5 = BlockReader(cache, "train", 200, views=True)  # (a reader finds the byte places when made)
    for block, other in zip(by_bytes, through_hdf5.gathered(groups), strict=True):
        assert torch.equal(block.features, other.features) and torch.equal(block.views, other.views)
        assert torch.equal(block.rows, other.rows)


@pytest.mark.parametrize("tta", [False, True])
def test_streamed_knn_searches_held_out_queries_in_groups_with_the_same_answer(cache, tta):
    """100 held-out queries (2 KB and a top-20 each, twice under TTA) over a quarter of a 200KB budget: gathered
    and searched a group at a time, they find the in-memory neighbours."""
    opts = dict(cache=str(cache), k=(1, 5, 20), val_fraction=0.25, device="cpu", tta=tta)
    whole = knn_evaluate(KnnOptions(**opts), log=lambda line: None)
    lines: list[str] = []
    streamed = knn_evaluate(KnnOptions(**opts, memory_budget="200KB"), log=lines.append)
    groups = [line for line in lines if line.startswith("kNN: 100 held-out queries in")]
    assert len(groups) == 1 and int(groups[0].split(" in ")[1].split()[0]) >= 4, lines
    assert streamed.val == whole.val and streamed.test == whole.test and streamed.rows == whole.rows
    assert streamed.reports == whole.reports
