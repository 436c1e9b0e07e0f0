"""Data sources: the table of kinds, labels checked when a source is opened, hidden files skipped, file lists."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import LOADERS, cache_error, interrupt_cache, make_cifar, make_folder, write_list

from fastfeat.cache import CacheOptions, build_cache
from fastfeat.cache_file import read_cache
from fastfeat.errors import InputError
from fastfeat.sources import DATASET_KINDS, KINDS, open_dataset


def test_every_kind_is_one_entry_and_unknown_names_list_them(tmp_path, capsys):
    assert DATASET_KINDS == ("auto", *KINDS) and {"cifar10", "cifar100", "hf", "folder", "list", "mnist", "fashion_mnist",
                                                  "dtd", "oxford_pets"} <= set(KINDS)
    assert "hf:uoft-cs/cifar10" in DATASET_KINDS and "hf:" in DATASET_KINDS and "imagenet-x" not in DATASET_KINDS
    with pytest.raises(InputError, match="unknown dataset 'imagenet-x': choose from auto, cifar10, cifar100, hf, webdataset, folder, list, "
                                         r"mnist, .*, country211, hf:NAME\[:CONFIG\]$"):
        open_dataset(tmp_path, "imagenet-x")
    with pytest.raises(InputError, match=r"--dataset hf:NAME\[:CONFIG\] needs a NAME"):
        open_dataset(tmp_path, "hf:")


@pytest.mark.parametrize("labels, expected", [
    ([0, 1, 10, 1], "label 10 \\(row 2\\) is outside the 10 classes"),
    ([0, -1, 1, 1], "label -1 \\(row 1\\) is outside the 10 classes"),
    ([0.5, 1.0, 1.0, 1.0], "labels must be integers"),
    ([0, 1, 1], "3 labels for 4 images"),
])
def test_cifar_labels_are_checked_when_opened(tmp_path, capsys, labels, expected):
    root = make_cifar(tmp_path / "c", n_train=20, n_test=4)
    batch = root / "cifar-10-batches-py" / "test_batch"
    values = pickle.loads(batch.read_bytes())
    meta = root / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    values[b"labels"] = labels
    batch.write_bytes(pickle.dumps(values))
    code, err = cache_error(capsys, "--data", str(root), "--out", str(tmp_path / "c.h5"))
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("fastfeat cache: error: ") and "test_batch" in err[0]
    assert re.search(expected, err[0]), err
    assert not (tmp_path / "c.h5").exists()


def test_hidden_files_and_folders_are_skipped(tmp_path):
    folder = make_folder(tmp_path / "f", sizes=((20, 20),), per_class=2)
    before = open_dataset(folder)
    (folder / "train" / "cat" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "train" / "dog" / ".hidden.png").write_bytes(b"junk")
    for split in ("train", "test"):
        (folder / split / ".ipynb_checkpoints").mkdir()
        (folder / split / ".ipynb_checkpoints" / "0-checkpoint.jpg").write_bytes(b"junk")
    after = open_dataset(folder)
    assert after.classes == before.classes == ("cat", "dog")
    for split in ("train", "test"):
        assert after.splits[split].files == before.splits[split].files
        np.testing.assert_array_equal(after.splits[split].labels, before.splits[split].labels)


@pytest.mark.parametrize("labels, sep", [("names", ","), ("integers", "\t")])
def test_a_file_list_lists_the_folders_rows(tmp_path, labels, sep):
    folder = make_folder(tmp_path / "f", sizes=((20, 24),), per_class=3)
    suffix = ".csv" if sep == "," else ".tsv"
    for split in ("train", "test"):
        write_list(folder, f"{split}{suffix}", labels, sep, split)
    if labels == "integers":
        (folder / "classes.txt").write_text("cat\ndog\n")
    listed, folders = open_dataset(folder, "list"), open_dataset(folder, "folder")
    assert listed.kind == "list" and listed.classes == folders.classes == ("cat", "dog")
    assert listed.source == f"train{suffix},test{suffix}"
    for split in ("train", "test"):
        assert listed.splits[split].files == folders.splits[split].files
        np.testing.assert_array_equal(listed.splits[split].labels, folders.splits[split].labels)



@pytest.mark.parametrize("loader", LOADERS)
def test_a_list_caches_the_same_features_as_its_folder(tmp_path, loader):
    folder = make_folder(tmp_path / "f", sizes=((40, 50), (37, 29)), per_class=3)
    (tmp_path / "lists").mkdir()
    for split in ("train", "test"):  # a list elsewhere: paths relative to the list file
        rel = write_list(folder, f"{split}.csv", split=split)
        (tmp_path / "lists" / f"{split}.csv").write_text(
            "\n".join(f"../f/{path},{path.split('/')[1]}" for path in rel) + "\n")
    opts = dict(weights="none", image_size=32, resize=36, device="cpu", progress=False, loader=loader, amp=False,
                dtype="float32")
    caches = {}
    for name, data, kind in (("folder", folder, "folder"), ("list", tmp_path / "lists", "list")):
        build_cache(CacheOptions(data=str(data), dataset=kind, out=str(tmp_path / f"{name}.h5"), **opts))
        caches[name] = read_cache(tmp_path / f"{name}.h5")
    assert caches["list"].attrs["dataset"] == "list" and caches["list"].attrs["dataset_source"] == "train.csv,test.csv"
    for split in ("train", "test"):
        a, b = caches["folder"].features[split], caches["list"].features[split]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert a.shape == b.shape and cos.min() >= 0.999
        np.testing.assert_array_equal(caches["folder"].labels[split], caches["list"].labels[split])
        assert [f.split("/")[-1] for f in caches["list"].files[split]] == [f.split("/")[-1] for f in caches["folder"].files[split]]


@pytest.mark.parametrize("case, expected", [
    ("missing file", "train.csv: listed image .*nope.jpg does not exist"),
    ("unknown label", "train.csv: label 'bird' is not one of the 2 classes \\(cat, dog\\)"),
    ("integer out of range", "train.csv: label 7 \\(row 0\\) is outside the 2 classes"),
    ("bad row", "train.csv: row 1 is not `path,label`"),
    ("no test list", "has no test.csv or test.tsv"),
])
def test_bad_file_lists_are_one_line(tmp_path, capsys, case, expected):
    folder = make_folder(tmp_path / "f", sizes=((20, 20),), per_class=2)
    write_list(folder, "test.csv", split="test")
    (folder / "classes.txt").write_text("cat\ndog\n")
    lines = {"missing file": "train/cat/nope.jpg,cat", "unknown label": "train/cat/0.jpg,bird",
             "integer out of range": "train/cat/0.jpg,7", "bad row": "train/cat/0.jpg", "no test list": "train/cat/0.jpg,cat"}
    (folder / "train.csv").write_text(lines[case] + "\n")
    if case == "no test list":
        (folder / "test.csv").unlink()
    code, err = cache_error(capsys, "--data", str(folder), "--dataset", "list", "--splits", "train,test",
                            "--out", str(tmp_path / "c.h5"))
    assert code == 2 and len(err) == 1 and err[0].startswith("fastfeat cache: error: "), err
    assert re.search(expected, err[0]), err


def test_resume_refuses_a_changed_list(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "f", sizes=((20, 20),), per_class=4)
    for split in ("train", "test"):
        write_list(folder, f"{split}.csv", split=split)
    opts = CacheOptions(data=str(folder), dataset="list", out=str(tmp_path / "c.h5"), weights="none", image_size=32,
                        resize=36, device="cpu", progress=False, loader="torch", amp=False, batch_size=2)
    interrupt_cache(monkeypatch, lambda: build_cache(opts), lambda split, start: split == "train" and start == 2)
    rows = (folder / "train.csv").read_text().splitlines()
    (folder / "train.csv").write_text("\n".join([rows[0], rows[1].replace(",cat", ",dog"), *rows[2:]]) + "\n")
    with pytest.raises(InputError, match="cannot resume .*different dataset_sha256"):
        build_cache(CacheOptions(**{**opts.__dict__, "resume": True}))


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic (0, 0, uint8, dims), big-endian sizes, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("kind, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_layouts_read_as_3_channel_arrays(tmp_path, kind, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    written = {}
    for split, prefix, n in (("train", "train", 12), ("test", "t10k", 5)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[split] = images, labels
    dataset = open_dataset(tmp_path, kind)
    assert open_dataset(tmp_path).kind == kind and len(dataset.classes) == 10
    assert dataset.classes[0] == ("0 - zero" if kind == "mnist" else "T-shirt/top")
    for split, (images, labels) in written.items():
        got = dataset.splits[split]
        assert got.images.shape == (len(labels), 28, 28, 3) and got.images.dtype == np.uint8
        for channel in range(3):
            np.testing.assert_array_equal(got.images[..., channel], images)
        np.testing.assert_array_equal(got.labels, labels)


def test_dtd_keeps_its_own_val_split_and_oxford_pets_its_trainval(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    dtd = tmp_path / "dtd" / "dtd"
    (dtd / "labels").mkdir(parents=True)
    lists = {"train": ["banded/b_1.jpg", "dotted/d_1.jpg"], "val": ["dotted/d_2.jpg", "banded/b_2.jpg"],
             "test": ["banded/b_3.jpg", "dotted/d_3.jpg"]}
    for split, names in lists.items():
        for name in names:
            (dtd / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(dtd / "images" / name)
        (dtd / "labels" / f"{split}1.txt").write_text("\n".join(names) + "\n")
    dataset = open_dataset(tmp_path, "dtd", splits=None)
    assert dataset.classes == ("banded", "dotted") and tuple(dataset.splits) == ("train", "val", "test")
    for split, names in lists.items():
        assert [str(Path(f).relative_to(dtd / "images")) for f in dataset.splits[split].files] == names
        assert dataset.splits[split].labels.tolist() == [0 if n.startswith("banded") else 1 for n in names]

    pets = tmp_path / "oxford-iiit-pet"
    (pets / "annotations").mkdir(parents=True)
    (pets / "images").mkdir()
    rows = {"trainval": ["Abyssinian_1 1 1 1", "great_pyrenees_4 2 2 1"], "test": ["great_pyrenees_9 2 2 1"]}
    for split, lines in rows.items():
        (pets / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(pets / "images" / f"{line.split()[0]}.jpg")
    pets_set = open_dataset(tmp_path, "oxford_pets")
    assert pets_set.classes == ("Abyssinian", "Great Pyrenees")
    assert pets_set.splits["train"].labels.tolist() == [0, 1] and pets_set.splits["test"].labels.tolist() == [1]
    assert Path(pets_set.splits["test"].files[0]).name == "great_pyrenees_9.jpg"


def test_a_missing_zoo_dataset_is_one_line(tmp_path, capsys):
    code, err = cache_error(capsys, "--data", str(tmp_path), "--dataset", "dtd", "--out", str(tmp_path / "c.h5"))
    assert code == 2 and len(err) == 1 and "not a readable DTD" in err[0] and "--download" in err[0], err


def test_an_offline_download_is_one_line(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    code, err = cache_error(capsys, "--data", str(tmp_path / "m"), "--dataset", "mnist", "--download",
                            "--out", str(tmp_path / "c.h5"))
    assert code == 2 and len(err) == 1 and "could not download MNIST" in err[0] and "name resolution" in err[0], err
