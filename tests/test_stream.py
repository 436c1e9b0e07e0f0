"""Features bigger than memory: the block reader (contiguous blocks, every row once, any block order),
--memory-budget parsing and its one-line refusals, and the streamed kNN against the in-memory one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run, separable, write_cache

from fastfeat.budget import StreamPlan, parse_size
from fastfeat.cache_file import BlockReader
from fastfeat.errors import InputError
from fastfeat.knn import KnnOptions, knn_evaluate

TINY = "40KB"  # a 20th of the train features below: every command streams


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    train, test = separable(400, rng), separable(100, rng)
    views = {s: (["flip"], (x + rng.normal(0, 0.3, x.shape)).astype(np.float16)[:, None]) for s, (x, _) in
             (("train", train), ("test", test))}
    return write_cache(tmp_path / "c.h5", {"train": train, "test": test}, views=views)


def test_parse_size():
    assert parse_size("512MB") == 512 * 10**6 and parse_size("8GB") == 8 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("100") == 100 and parse_size("64 kib") == 2**16
    for bad in ("0", "-1GB", "lots", "", "1.2.3GB", "5XB", "0.1B"):
        with pytest.raises(InputError, match="--memory-budget must be a positive size"):
            parse_size(bad)


@pytest.mark.parametrize("budget", ["0", "-1GB", "lots"])
def test_bad_budget_is_one_line(cache, capsys, budget):
    code, _, err = run(["knn", "--cache", str(cache), "--device", "cpu", f"--memory-budget={budget}"], capsys)
    assert code == 2 and len(err) == 1 and "--memory-budget must be a positive size" in err[0], err


def test_blocks_are_contiguous_and_cover_every_row_once(cache):
    reader = BlockReader(cache, "train", 48, views=True)
    assert reader.block_rows == 48 and reader.starts == list(range(0, 400, 48)) and reader.view_names == ["flip"]
    order = list(reversed(reader.starts))
    blocks = list(reader.blocks(order))
    assert [b.start for b in blocks] == order
    seen = torch.cat([torch.arange(b.start, b.start + len(b.labels)) for b in blocks])
    assert sorted(seen.tolist()) == list(range(400))
    by_start = {b.start: b for b in blocks}
    features = torch.cat([by_start[s].features for s in reader.starts])
    rng = np.random.default_rng(0)
    x, y = separable(400, rng)
    assert features.dtype == torch.float32 and torch.equal(features, torch.from_numpy(x.astype(np.float32)))
    assert torch.equal(torch.cat([by_start[s].labels for s in reader.starts]), torch.from_numpy(y))
    assert blocks[0].views.shape == (400 - order[0], 1, 512)


def test_plan_streams_only_over_budget(cache):
    device = torch.device("cpu")
    assert not StreamPlan.for_splits(str(cache), ("train", "test"), "1GB", device).streams
    plan = StreamPlan.for_splits(str(cache), ("train", "test"), TINY, device)
    assert plan.streams and 1 <= plan.block_rows < 400 and "blocks of" in plan.describe(2)


@pytest.mark.parametrize("val_fraction,tta", [(0.2, False), (0.0, False), (0.25, True), (0.0, True)])
def test_streamed_knn_is_the_in_memory_answer(cache, val_fraction, tta):
    opts = dict(cache=str(cache), k=(1, 5, 20), val_fraction=val_fraction, device="cpu", tta=tta)
    lines: list[str] = []
    whole = knn_evaluate(KnnOptions(**opts), log=lines.append)
    assert lines == []  # the data fit: the in-memory path, unchanged
    streamed = knn_evaluate(KnnOptions(**opts, memory_budget=TINY), log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("streaming train"), lines
    assert streamed.val == whole.val and streamed.test == whole.test and streamed.rows == whole.rows
    assert streamed.tta == whole.tta == tta and streamed.reports == whole.reports


def test_info_shows_split_bytes(cache, capsys):
    code, out, _ = run(["info", str(cache), "--json"], capsys)
    splits = json.loads(out)["splits"]
    assert code == 0 and splits["train"]["bytes"] == 400 * 512 * 2 * 2 + 400 * 8  # features, flips, labels
