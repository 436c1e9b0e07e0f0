"""fastfeat knn: the weighted kNN of DINO against a brute-force numpy reference, blocked = unblocked,
validation that never sees itself, the command end to end, one-line refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import reference_predictions, run, separable, write_cache

from fastfeat.errors import InputError
from fastfeat.knn import (
    KnnOptions,
    block_sizes,
    check_options,
    knn_evaluate,
    knn_predict,
    top_neighbours,
)


def gaussian(n: int, rng: np.random.Generator, classes: int = 4, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Continuous features (no two similarities equal), class means close enough that k and T matter."""
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 1, (classes, dim))
    return (rng.normal(0, 1, (n, dim)) + 0.6 * centres[y]).astype(np.float32), y


def normalised(x: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.from_numpy(x), dim=1)


@pytest.mark.parametrize("temperature", [0.02, 0.07, 0.5, 10.0])
def test_matches_brute_force_reference(temperature):
    rng = np.random.default_rng(1)
    train_x, train_y = gaussian(300, rng)
    queries, _ = gaussian(40, rng)
    ks = (1, 3, 10, 50, 300)
    preds = knn_predict(normalised(train_x), torch.from_numpy(train_y), normalised(queries), ks, temperature, 4)
    assert sorted(preds) == list(ks)
    for k in ks:
        np.testing.assert_array_equal(preds[k].numpy(), reference_predictions(train_x, train_y, queries, k,
                                                                              temperature, 4), err_msg=f"k={k}")
    # k = all rows at a high temperature is nearly the class count: the votes really depend on k and T
    assert not all((preds[1] == preds[k]).all() for k in ks)


def test_vote_ties_go_to_the_lower_class_like_numpy_argmax():
    train_x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    train_y = np.array([2, 1, 0])
    queries = np.array([[1.0, 0.0]], dtype=np.float32)
    preds = knn_predict(normalised(train_x), torch.from_numpy(train_y), normalised(queries), (2,), 0.07, 3)
    assert preds[2].item() == 1 == reference_predictions(train_x, train_y, queries, 2, 0.07, 3)[0]


def test_blocked_search_is_the_unblocked_one():
    """Tiny query and train blocks (train blocks smaller than k, so the running top-k merge does the work)."""
    rng = np.random.default_rng(2)
    train_x, train_y = gaussian(257, rng)
    queries, _ = gaussian(61, rng)
    tx, ty, q = normalised(train_x), torch.from_numpy(train_y), normalised(queries)
    sims, idx = top_neighbours(q, tx, 40)
    for train_rows in (1, 7, 39, 40, 100):
        block_sims, block_idx = top_neighbours(q, tx, 40, train_rows)
        torch.testing.assert_close(block_sims, sims, rtol=0, atol=1e-6)
        assert torch.equal(block_idx, idx), train_rows
    assert (sims[:, :-1] >= sims[:, 1:]).all()  # most similar first
    ks = (1, 5, 40)
    whole = knn_predict(tx, ty, q, ks, 0.07, 4)
    assert block_sizes(61, 257, None, None) == (61, 257)
    for query_rows, train_rows in ((1, None), (9, 7), (None, 5), (16, 300)):
        blocked = knn_predict(tx, ty, q, ks, 0.07, 4, query_rows, train_rows)
        for k in ks:
            assert torch.equal(blocked[k], whole[k]), (query_rows, train_rows, k)
    # a small budget splits both ways on its own
    assert block_sizes(61, 257, None, None, budget_bytes=4 * 64 * 100) == (61, 100)
    assert block_sizes(1000, 257, None, None, budget_bytes=4 * 64 * 100) == (64, 100)
    small = knn_predict(tx, ty, q, ks, 0.07, 4, budget_bytes=4 * 64 * 10)
    assert all(torch.equal(small[k], whole[k]) for k in ks)


def test_validation_never_uses_its_own_rows(tmp_path):
    """Labels independent of the features: a validation row that could be its own neighbour would be
    right every time at k = 1 (similarity 1); among the other rows it is right by chance only."""
    rng = np.random.default_rng(3)
    train = (rng.normal(0, 1, (600, 64)).astype(np.float32), rng.integers(0, 3, 600))
    test = (rng.normal(0, 1, (90, 64)).astype(np.float32), rng.integers(0, 3, 90))
    cache = write_cache(tmp_path / "noise.h5", {"train": train, "test": test})
    result = knn_evaluate(KnnOptions(cache=str(cache), k=(1, 5), val_fraction=0.25, device="cpu"))
    assert result.rows == {"train": 600, "val": 150, "test": 90, "neighbours_val": 450, "neighbours_test": 600}
    assert result.val[1] < 0.6 and result.test[1] < 0.6, result
    # and a test query that is a train row finds it: test's neighbours are all of train
    test = (train[0][:90].copy(), train[1][:90].copy())
    cache = write_cache(tmp_path / "copies.h5", {"train": train, "test": test})
    result = knn_evaluate(KnnOptions(cache=str(cache), k=(1,), val_fraction=0.25, device="cpu"))
    assert result.test[1] == 1.0 and result.val[1] < 0.6


@pytest.fixture
def toy_cache(tmp_path):
    rng = np.random.default_rng(0)
    return write_cache(tmp_path / "toy.h5", {"train": separable(600, rng), "test": separable(200, rng)})


def test_cli_end_to_end(toy_cache, tmp_path, capsys):
    metrics = tmp_path / "out" / "knn.json"
    code, out, err = run(["knn", "--cache", str(toy_cache), "--k", "20,1,5,5", "--temperature", "0.1",
                          "--val-fraction", "0.2", "--seed", "4", "--device", "cpu", "--batch-size", "64",
                          "--metrics", str(metrics)], capsys)
    assert code == 0 and not err, err
    lines = out.splitlines()
    assert lines[0].split() == ["k", "val", "acc", "test", "acc"] and [int(l.split()[0]) for l in lines[1:4]] == [1, 5, 20]
    assert len(lines) == 5 and lines[4].startswith("knn in ") and "best k" in lines[4]
    report = json.loads(metrics.read_text())
    assert report["command"] == "knn" and report["k"] == [1, 5, 20]
    assert set(report["val"]["per_k"]) == set(report["test"]["per_k"]) == {"1", "5", "20"}
    assert report["options"]["temperature"] == 0.1 and report["options"]["k"] == [1, 5, 20]
    rows = report["rows"]
    assert abs(rows["val"] - 120) <= 2 and rows["val"] + rows["neighbours_val"] == 600 and report["seconds"] >= 0
    assert min(report["test"]["per_k"].values()) > 0.9  # the classes show in 8 of 512 noisy dimensions
    # test accuracy is the brute-force reference's over every test query, to the row
    from fastfeat.cache_file import read_cache

    cache = read_cache(toy_cache)
    for k in (1, 5, 20):
        ref = reference_predictions(cache.features["train"], cache.labels["train"], cache.features["test"], k, 0.1, 3)
        assert report["test"]["per_k"][str(k)] == pytest.approx((ref == cache.labels["test"]).mean(), abs=1e-6)
        if k == report["best_k"]:  # the best k's per-class results and confusion matrix, counted directly
            confusion = np.zeros((3, 3), dtype=int)
            np.add.at(confusion, (cache.labels["test"], ref), 1)
            assert report["test"]["confusion"] == confusion.tolist()
            assert report["test"]["top1"] == pytest.approx(report["test"]["per_k"][str(k)])
            assert report["test"]["per_class"] == pytest.approx((confusion.diagonal() / confusion.sum(1)).tolist())
    # the same numbers from the Python API; no validation with --val-fraction 0
    api = knn_evaluate(KnnOptions(cache=str(toy_cache), k=(1, 5, 20), temperature=0.1, val_fraction=0.2, seed=4,
                                  device="cpu"))
    assert {str(k): v for k, v in api.val.items()} == report["val"]["per_k"]
    code, out, err = run(["knn", "--cache", str(toy_cache), "--val-fraction", "0", "--device", "cpu"], capsys)
    assert code == 0 and not err and "no validation; best k" in out.splitlines()[-1]
    assert [l.split()[1] for l in out.splitlines()[1:5]] == ["-"] * 4


def test_every_option_is_a_flag_with_the_dataclass_default():
    from dataclasses import fields

    from fastfeat.cli import build_parser
    from fastfeat.options import from_args

    args = build_parser().parse_args(["knn"])
    assert from_args(KnnOptions, args) == KnnOptions() and args.metrics is None
    for f in fields(KnnOptions):
        assert f.metadata["help"] and getattr(args, f.name) == f.default, f.name
    args = build_parser().parse_args(["knn", "--k", "20, 5", "--temperature", "0.1", "--batch-size", "7"])
    opts = check_options(from_args(KnnOptions, args))
    assert (opts.k, opts.temperature, opts.batch_size) == ((5, 20), 0.1, 7)


def test_k_option_parsing():
    assert check_options(KnnOptions(k=(200, 10, 20, 10))).k == (10, 20, 200)
    assert check_options(KnnOptions(k=(3,))).k == (3,)
    with pytest.raises(InputError, match="--k must be a whole number, got 2.5"):
        check_options(KnnOptions(k=(2.5,)))


@pytest.mark.parametrize("args, match", [
    (["--k", "0"], "--k must be a whole number >= 1, got 0"),
    (["--k", "10,-5"], "--k must be a whole number >= 1, got -5"),
    (["--k", "ten"], "argument --k: invalid comma-separated int value: 'ten'"),
    (["--k", "2.5"], "argument --k: invalid comma-separated int value: '2.5'"),
    (["--k", ","], "--k needs at least one value"),
    (["--k", "700", "--val-fraction", "0"], "more neighbours than the 600 train rows"),
    (["--k", "550"], "more neighbours than the 540 train rows outside validation"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--temperature", "-1"], "--temperature must be a finite number > 0"),
    (["--temperature", "nan"], "not a finite number"),
    (["--temperature", "inf"], "not a finite number"),
    (["--val-fraction", "1"], "--val-fraction must be a finite number >= 0 and < 1"),
    (["--val-fraction", "-0.1"], "--val-fraction must be a finite number >= 0 and < 1"),
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    (["--device", "tpu"], "unknown device"),
])
def test_bad_input_is_one_line(toy_cache, capsys, args, match):
    code, out, err = run(["knn", "--cache", str(toy_cache), "--device", "cpu", *args], capsys)
    assert code == 2 and len(err) == 1 and not out, (code, err)
    assert err[0].startswith("fastfeat knn: ") and match in err[0], err[0]


def test_bad_cache_is_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.h5"
    junk.write_text("not an hdf5 file")
    partial = write_cache(tmp_path / "partial.h5", {"train": separable(30, np.random.default_rng(0)),
                                                     "test": separable(9, np.random.default_rng(1))}, finish=False)
    for cache in (tmp_path / "missing.h5", junk, partial):
        code, _, err = run(["knn", "--cache", str(cache), "--device", "cpu"], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("fastfeat knn: error: "), (cache, err)
