"""A dataset's own val/ folder is its validation split (train/, val/, test/); a lone val/ stays the test split."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from helpers import CLASSES, TINY, make_cifar, make_folder, reference_predictions, run, separable, write_cache

from fastfeat.head import HeadOptions, train_head
from fastfeat.knn import KnnOptions, knn_evaluate
from fastfeat.model_files import load_head
from fastfeat.sources import open_dataset

def test_a_folder_with_val_beside_test_has_three_splits(tmp_path):
    root = make_folder(tmp_path / "f", splits=("train", "val", "test"), per_class=2)
    dataset = open_dataset(root, splits=None)
    assert list(dataset.splits) == ["train", "val", "test"]
    assert all(f.split("/")[-3] == "val" for f in dataset.splits["val"].files)
    assert all(f.split("/")[-3] == "test" for f in dataset.splits["test"].files)


def test_a_lone_val_folder_is_still_the_test_split(tmp_path):
    root = make_folder(tmp_path / "f", splits=("train", "val"), per_class=2)
    dataset = open_dataset(root, splits=None)
    assert list(dataset.splits) == ["train", "test"]
    assert all(f.split("/")[-3] == "val" for f in dataset.splits["test"].files)


def test_cache_writes_the_val_split_by_default(tmp_path, capsys):
    root = make_folder(tmp_path / "f", splits=("train", "val", "test"), per_class=2)
    code, _, err = run(["cache", "--data", str(root), *TINY, "--out", str(tmp_path / "c.h5")], capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "c.h5") as f:
        assert {name: len(f[name]["labels"]) for name in ("train", "val", "test")} == {"train": 4, "val": 4, "test": 4}
        assert all(name.startswith("val/") for name in f["val"]["files"].asstr()[:])


@pytest.mark.parametrize("layout", ["cifar", "lone-val"])
def test_asking_for_a_val_split_the_dataset_lacks_is_one_line(tmp_path, capsys, layout):
    root = make_cifar(tmp_path / "c") if layout == "cifar" else make_folder(tmp_path / "f", splits=("train", "val"))
    code, _, err = run(["cache", "--data", str(root), *TINY, "--splits", "train,val", "--out", str(tmp_path / "c.h5")],
                       capsys)
    assert code == 2 and len(err) == 1 and "no val" in err[0], err
    assert not (tmp_path / "c.h5").exists()


def own_val_cache(tmp_path) -> tuple:
    """A cache with train, val and test splits, as `fastfeat cache` writes one of a folder with its own val/."""
    rng = np.random.default_rng(5)
    splits = {name: separable(n, rng) for name, n in (("train", 300), ("val", 90), ("test", 120))}
    return write_cache(tmp_path / "own-val.h5", splits), splits


def test_train_head_fits_all_of_train_and_validates_on_the_cached_val_split(tmp_path, capsys):
    path, splits = own_val_cache(tmp_path)
    result = train_head(HeadOptions(cache=str(path), device="cpu", epochs=3, out=str(tmp_path / "h.pt")),
                        log=lambda line: None)
    assert result.validation == "val"
    head, _, _ = load_head(tmp_path / "h.pt")
    val_x, val_y = torch.from_numpy(splits["val"][0].astype(np.float32)), torch.from_numpy(splits["val"][1])
    with torch.no_grad():
        assert result.history[-1]["valid_acc"] == pytest.approx((head(val_x).argmax(1) == val_y).float().mean().item())
    torch.testing.assert_close(head.mean, torch.from_numpy(splits["train"][0].astype(np.float32)).mean(0), atol=2e-3, rtol=0)  # all 300 train rows
    code, out, _ = run(["train-head", "--cache", str(path), "--device", "cpu", "--epochs", "2", "--out", str(tmp_path / "h2.pt")], capsys)
    assert code == 0 and "on the cache's own val split" in out


def test_knn_validates_on_the_cached_val_split_with_every_train_row_as_neighbour(tmp_path):
    path, splits = own_val_cache(tmp_path)
    result = knn_evaluate(KnnOptions(cache=str(path), k=(1, 5), device="cpu"))
    assert result.validation == "val" and result.rows["val"] == 90 and result.rows["neighbours_val"] == 300
    (train_x, train_y), (val_x, val_y) = splits["train"], splits["val"]
    for k in (1, 5):
        ref = reference_predictions(train_x, train_y, val_x, k, 0.07, len(CLASSES))
        assert result.val[k] == pytest.approx((ref == val_y).mean())
    assert set(result.metrics()["val"]) >= {"top1", "mean_per_class", "per_class", "confusion", "per_k"}


@pytest.mark.slow
def test_finetune_validates_on_the_datasets_own_val_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "f", splits=("train", "val", "test"), per_class=3)
    code, out, err = run(["finetune", "--data", str(root), *TINY, "--epochs", "1", "--batch-size", "3",
                          "--checkpoint-dir", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    metrics = __import__("json").loads((tmp_path / "m.json").read_text())
    assert metrics["validation"] == "val" and "on the dataset's own val split" in out
    assert sum(map(sum, metrics["val"]["confusion"])) == 6  # the 6 images of val/, none held out of train
    assert sum(map(sum, metrics["test"]["confusion"])) == 6
    assert metrics["epochs"][0]["train_images"] == 6  # all of train/ trains (batches of 3: no ragged tail)
