"""--dataset cifar100: the official `cifar-100-python/` layout (fine labels, names from `meta`), read
through the same restricted unpickler as CIFAR-10, auto-detected, downloadable, cached end to end."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, Payload, fastfeat_here, make_cifar, refused

from fastfeat import InputError, open_dataset, read_cache
from fastfeat.cache import default_cache_path
from fastfeat.cli import main
from fastfeat.settings import DataOptions
from fastfeat.sources import DATASET_KINDS
from fastfeat.synthetic import ImageSet, make_split, write_cifar100

CLASSES = tuple(f"class{i:02d}" for i in range(100))  # the real release's 100 fine classes
TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2
COARSE = [(7 * i + 3) % 20 for i in range(100)]  # superclasses unrelated to the fine order: must not leak in


def write_data(root: Path) -> tuple[Path, ImageSet, ImageSet]:
    train = make_split(TRAIN_PER_CLASS, CLASSES, 0, (5, 0))
    test = make_split(TEST_PER_CLASS, CLASSES, TRAIN_PER_CLASS, (5, 1))
    write_cifar100(root, train, test, CLASSES, coarse=COARSE)
    return root, train, test


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, ImageSet, ImageSet]:
    return write_data(tmp_path_factory.mktemp("cifar100"))


def test_the_writer_follows_the_official_layout(data):
    root, train, _ = data
    base = root / "cifar-100-python"
    assert sorted(p.name for p in base.iterdir()) == ["meta", "test", "train"]
    raw = (base / "train").read_bytes()
    assert raw[:2] == b"\x80\x02"  # protocol 2, like the official python-2 pickles
    batch = pickle.loads(raw, encoding="bytes")
    assert set(batch) == {b"batch_label", b"fine_labels", b"coarse_labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (len(train), 3072)
    assert batch[b"fine_labels"] == train.labels.tolist()
    assert batch[b"coarse_labels"] == [COARSE[y] for y in train.labels.tolist()]
    assert batch[b"filenames"] == [n.encode() for n in train.names]
    meta = pickle.loads((base / "meta").read_bytes(), encoding="bytes")
    assert meta[b"fine_label_names"] == [c.encode() for c in CLASSES]
    assert meta[b"coarse_label_names"] == [f"superclass{j:02d}".encode() for j in range(20)]


@pytest.mark.parametrize("kind", ["auto", "cifar100"])
def test_fine_labels_names_pixels_and_file_order(data, kind):
    root, train, test = data
    dataset = open_dataset(root, kind)
    assert dataset.kind == "cifar100" and dataset.classes == CLASSES
    for name, written in (("train", train), ("test", test)):
        split = dataset.splits[name]
        assert split.images.shape == (100 * (TRAIN_PER_CLASS if name == "train" else TEST_PER_CLASS), 32, 32, 3)
        assert split.labels.dtype == np.int64
        np.testing.assert_array_equal(split.labels, written.labels)  # the fine labels, rows in file order
        np.testing.assert_array_equal(split.images, written.images)  # exactly the pixels written
    assert (np.diff(dataset.splits["train"].labels) < 0).any()  # file order, not sorted by class


def test_limit_keeps_every_fine_class(data):
    dataset = open_dataset(data[0], "cifar100", limit=200)
    assert np.bincount(dataset.splits["train"].labels).tolist() == [2] * 100
    with pytest.raises(InputError, match="smaller than the 100 classes"):
        open_dataset(data[0], "cifar100", limit=99)


def test_both_cifars_make_auto_ambiguous(data, tmp_path, capsys):
    root, train, _ = write_data(tmp_path / "both")
    make_cifar(root, n_train=10, n_test=4)
    with pytest.raises(InputError, match="both cifar-10-batches-py/ and cifar-100-python/: pass --dataset cifar10 "
                                         "or --dataset cifar100"):
        open_dataset(root)
    assert open_dataset(root, "cifar10").classes == ("dark", "bright")
    np.testing.assert_array_equal(open_dataset(root, "cifar100").splits["train"].labels, train.labels)
    done = fastfeat_here(capsys, "cache", "--data", root, "--out", tmp_path / "c.h5", *TINY, "--no-progress")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"fastfeat cache: error: {root} holds both ") and "--dataset" in done.stderr


def test_cache_end_to_end_on_the_cpu_with_the_default_path(data, tmp_path, monkeypatch, capsys):
    root, train, test = data
    monkeypatch.chdir(tmp_path)
    assert main(["cache", "--data", str(root), "--dataset", "cifar100", "--batch-size", "256", *TINY, "--no-progress"]) == 0
    out = Path("data") / "cifar100-resnet18.h5"
    assert out.is_file() and default_cache_path(open_dataset(root), "resnet18") == out
    cache = read_cache(out)
    assert json.loads(cache.attrs["classes"]) == list(CLASSES) and cache.attrs["dataset"] == "cifar100"
    for name, written in (("train", train), ("test", test)):
        np.testing.assert_array_equal(cache.labels[name], written.labels)
        assert cache.features[name].shape == (len(written), 512) and np.isfinite(cache.features[name]).all()


def test_damaged_and_missing_files_are_one_line(tmp_path):
    root, _, _ = write_data(tmp_path / "d")
    base = root / "cifar-100-python"
    (base / "meta").write_bytes(pickle.dumps({b"coarse_label_names": [b"x"]}, protocol=2))
    with pytest.raises(InputError, match=r"meta has no CIFAR-100 class names \(b'fine_label_names'\)"):
        open_dataset(root)
    (base / "meta").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="^unreadable CIFAR-100 file .*meta: "):
        open_dataset(root)
    (base / "meta").unlink()
    with pytest.raises(InputError, match=f"^missing CIFAR-100 file {base / 'meta'}$"):
        open_dataset(root, "cifar100")
    root, _, _ = write_data(tmp_path / "e")
    (root / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}, protocol=2))
    with pytest.raises(InputError, match="does not hold CIFAR-100 python batches"):
        open_dataset(root)
    assert len(open_dataset(root, splits=("train",)).splits["train"]) == 300  # the test split is read only when asked


def test_offline_download_is_one_line(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    argv = ["cache", "--data", str(tmp_path / "dl"), "--download", "--weights", "none", "--no-progress", "--device", "cpu"]
    assert main([*argv, "--dataset", "cifar100"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "could not download CIFAR-100 (<urlopen error" in err
    assert "cifar-100-python.tar.gz" in err and f"{tmp_path / 'dl' / 'cifar-100-python'}/ holds train, test and meta" in err
    assert main(argv) == 2  # --dataset auto still downloads CIFAR-10
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "could not download CIFAR-10 (" in err and "cifar-10-batches-py" in err


def test_download_is_skipped_when_the_release_is_there(data, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", pytest.fail)
    assert open_dataset(data[0], "cifar100", download=True).kind == "cifar100"


@pytest.mark.parametrize("name", ["train", "meta"])
def test_a_crafted_cifar100_file_is_refused_in_one_line(name, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    root, _, _ = write_data(tmp_path / "cifar")
    path = root / "cifar-100-python" / name
    path.write_bytes(pickle.dumps({b"data": Payload(marker), b"fine_labels": [0]}, protocol=2))
    done = fastfeat_here(capsys, "cache", "--data", root, "--dataset", "cifar100", "--out", tmp_path / "c.h5", *TINY, "--no-progress")
    assert done.returncode == 2 and refused(done.stderr, "cache", "CIFAR-100 file", path, "numpy arrays and plain values"), done.stderr
    assert not marker.exists() and not (tmp_path / "c.h5").exists()


def test_the_cli_choices_are_the_readers_kinds():
    from dataclasses import fields

    choices = next(f for f in fields(DataOptions) if f.name == "dataset").metadata["choices"]
    assert tuple(choices) == DATASET_KINDS
