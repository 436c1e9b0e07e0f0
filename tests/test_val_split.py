"""A dataset's own val/ folder is its validation split (train/, val/, test/); a lone val/ stays the test split."""
from __future__ import annotations

import h5py
import pytest
from conftest import make_cifar, make_folder, run

from fastfeat.sources import open_dataset

TINY = ["--weights", "none", "--image-size", "32", "--resize", "36", "--loader", "torch", "--device", "cpu"]


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
