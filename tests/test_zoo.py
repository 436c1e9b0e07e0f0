"""torchvision's dataset zoo: tiny files in each set's real on-disk layout, opened with download=False.

Every file set is checked against the rows its layout was written with; the array sets (SVHN, STL-10,
PCAM) also against torchvision's own class decoding the same files image by image.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import cache_error, interrupt_cache
from PIL import Image

from fastfeat.cache import CacheOptions, build_cache
from fastfeat.cache_file import read_cache
from fastfeat.errors import InputError
from fastfeat.sources import KINDS, open_dataset
from fastfeat.sources.zoo import HELD_OUT

RNG = np.random.default_rng(0)
Rows = dict[str, tuple[list[str], list[int]]]  # split -> (image paths relative to the set's folder, labels)


def image(path: Path, size: int = 8, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def images(base: Path, rows: Rows) -> Rows:
    for files, _ in rows.values():
        for f in files:
            image(base / f)
    return rows


def no_md5(monkeypatch, module: str) -> None:
    """torchvision checks the md5 of the official files; these tiny ones are not them."""
    import importlib

    monkeypatch.setattr(importlib.import_module(f"torchvision.datasets.{module}"), "check_integrity", lambda *a, **k: True)


# ---- one writer per file set: the layout, and the rows it must read as ----------------------------------------


def flowers102(root: Path, monkeypatch) -> tuple[Path, Rows]:
    import scipy.io

    no_md5(monkeypatch, "flowers102")
    base = root / "flowers-102"
    labels = [3, 1, 1, 3, 102, 3, 5]  # 1-based, image_00001..7
    ids = {"train": [2, 1], "val": [7, 4], "test": [6, 5, 3]}
    base.mkdir()
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array(ids["train"]), "valid": np.array(ids["val"]),
                                          "tstid": np.array(ids["test"])})
    return base, images(base, {s: ([f"jpg/image_{i:05d}.jpg" for i in v], [labels[i - 1] - 1 for i in v])
                               for s, v in ids.items()})


def food101(root: Path, monkeypatch) -> tuple[Path, Rows]:
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    meta = {"train": {"ramen": ["ramen/11", "ramen/3"], "apple_pie": ["apple_pie/7"]},
            "test": {"apple_pie": ["apple_pie/2"], "ramen": ["ramen/5"]}}
    for split, listed in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(listed))
    rows = {s: ([f"images/{p}.jpg" for c in m for p in m[c]], [0 if c == "apple_pie" else 1 for c in m for _ in m[c]])
            for s, m in meta.items()}
    return base, images(base, rows)


def stanford_cars(root: Path, monkeypatch) -> tuple[Path, Rows]:
    import scipy.io

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat",
                     {"class_names": np.array(["AM General Hummer", "Acura RL", "Audi R8"], dtype=object)})
    annos = {"train": [("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 2)], "test": [("00001.jpg", 2), ("00002.jpg", 3)]}
    for split, rows in annos.items():
        where = base / "devkit" / "cars_train_annos.mat" if split == "train" else base / "cars_test_annos_withlabels.mat"
        scipy.io.savemat(where, {"annotations": np.array(rows, dtype=[("fname", object), ("class", object)])})
    return base, images(base, {s: ([f"cars_{s}/{f}" for f, _ in r], [c - 1 for _, c in r]) for s, r in annos.items()})


def fgvc_aircraft(root: Path, monkeypatch) -> tuple[Path, Rows]:
    base = root / "fgvc-aircraft-2013b"
    (base / "data").mkdir(parents=True)
    variants = ["707-320", "Boeing 737-700", "A380"]
    (base / "data" / "variants.txt").write_text("\n".join(variants) + "\n")
    lists = {"train": [("1025794", 1), ("0034309", 0)], "val": [("1340192", 2)], "test": [("0056978", 1), ("0062765", 2)]}
    for split, rows in lists.items():
        (base / "data" / f"images_variant_{split}.txt").write_text("".join(f"{n} {variants[y]}\n" for n, y in rows))
    return base, images(base, {s: ([f"data/images/{n}.jpg" for n, _ in r], [y for _, y in r]) for s, r in lists.items()})


def gtsrb(root: Path, monkeypatch) -> tuple[Path, Rows]:
    base = root / "gtsrb"
    train = [("GTSRB/Training/00000/00000_00000.ppm", 0), ("GTSRB/Training/00000/00000_00001.ppm", 0),
             ("GTSRB/Training/00001/00000_00000.ppm", 1)]
    test = [("00001.ppm", 1), ("00000.ppm", 0)]
    base.mkdir()
    with (base / "GT-final_test.csv").open("w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        writer.writerows([name, 8, 8, 0, 0, 7, 7, y] for name, y in test)
    rows = {"train": ([p for p, _ in train], [y for _, y in train]),
            "test": ([f"GTSRB/Final_Test/Images/{n}" for n, _ in test], [y for _, y in test])}
    return base, images(base, rows)


def country211(root: Path, monkeypatch) -> tuple[Path, Rows]:
    base = root / "country211"
    # valid lacks AD: torchvision numbers its classes per split, fastfeat by the train split's
    rows = {"train": (["train/AD/1.jpg", "train/AE/2.jpg", "train/AE/3.jpg"], [0, 1, 1]), "val": (["valid/AE/4.jpg"], [1]),
            "test": (["test/AD/5.jpg", "test/AE/6.jpg"], [0, 1])}
    return base, images(base, rows)


FILE_SETS = {"flowers102": flowers102, "food101": food101, "stanford_cars": stanford_cars,
             "fgvc_aircraft": fgvc_aircraft, "gtsrb": gtsrb, "country211": country211}


@pytest.mark.parametrize("kind", FILE_SETS)
def test_file_sets_list_their_official_splits(tmp_path, monkeypatch, kind):
    base, rows = FILE_SETS[kind](tmp_path, monkeypatch)
    dataset = open_dataset(tmp_path, kind, splits=None)
    assert open_dataset(tmp_path).kind == kind  # --dataset auto finds the layout
    assert tuple(dataset.splits) == tuple(rows)
    for split, (files, labels) in rows.items():
        got = dataset.splits[split]
        assert [str(Path(f).relative_to(base)) for f in got.files] == files
        assert got.labels.tolist() == labels
    expected = {"flowers102": 102, "food101": ("apple_pie", "ramen"), "gtsrb": 43, "country211": ("AD", "AE"),
                "stanford_cars": ("AM General Hummer", "Acura RL", "Audi R8"),
                "fgvc_aircraft": ("707-320", "Boeing 737-700", "A380")}[kind]
    assert (len(dataset.classes) if isinstance(expected, int) else dataset.classes) == expected
    if kind == "flowers102":
        assert dataset.classes[:2] == ("pink primrose", "hard-leaved pocket orchid")


def write_caltech(root: Path) -> dict[str, int]:
    counts = {"BACKGROUND_Google": 2, "Faces": 5, "accordion": 3}
    for name, n in counts.items():
        for i in range(1, n + 1):
            image(root / "caltech101" / "101_ObjectCategories" / name / f"image_{i:04d}.jpg", mode="L" if i == 1 else "RGB")
    return counts


def test_sets_without_splits_hold_out_a_stratified_fixed_test_split(tmp_path):
    import torchvision.datasets

    write_caltech(tmp_path)
    whole = torchvision.datasets.Caltech101(str(tmp_path))
    reference = [f"{whole.categories[y]}/image_{i:04d}.jpg" for i, y in zip(whole.index, whole.y)]
    dataset = open_dataset(tmp_path, "caltech101", seed=5)
    assert dataset.classes == ("Faces", "accordion") and tuple(dataset.splits) == ("train", "test")
    got = {s: [str(Path(f).relative_to(tmp_path / "caltech101" / "101_ObjectCategories")) for f in split.files]
           for s, split in dataset.splits.items()}
    assert sorted(got["train"] + got["test"]) == sorted(reference) and not set(got["train"]) & set(got["test"])
    labels = {s: split.labels for s, split in dataset.splits.items()}
    assert np.bincount(labels["test"]).tolist() == [round(HELD_OUT * 5), 1]  # at least one of each class
    for s in got:
        assert labels[s].tolist() == [whole.y[reference.index(f)] for f in got[s]]
    assert got == {s: [str(Path(f).relative_to(tmp_path / "caltech101" / "101_ObjectCategories")) for f in split.files]
                   for s, split in open_dataset(tmp_path, "caltech101", seed=9).splits.items()}  # not --seed's


def test_sun397_and_eurosat_read_their_class_layouts(tmp_path):
    sun = tmp_path / "SUN397"
    sun.mkdir()
    (sun / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    for name in ("b/bakery/shop/sun_b.jpg", "a/abbey/sun_z.jpg", "a/abbey/sun_a.jpg", "b/bakery/shop/sun_a.jpg"):
        image(sun / name)
    dataset = open_dataset(tmp_path, "sun397")
    assert dataset.classes == ("abbey", "bakery/shop")
    for split in dataset.splits.values():
        files = [str(Path(f).relative_to(sun)) for f in split.files]
        assert files == sorted(files) and split.labels.tolist() == [int(f.startswith("b/")) for f in files]
    euro = tmp_path / "e"
    for name in ("Forest/Forest_1.jpg", "Forest/Forest_2.jpg", "AnnualCrop/AnnualCrop_1.jpg", "AnnualCrop/AnnualCrop_2.jpg"):
        image(euro / "eurosat" / "2750" / name)
    eurosat = open_dataset(euro, "eurosat")
    assert eurosat.classes == ("AnnualCrop", "Forest") and [len(s) for s in eurosat.splits.values()] == [2, 2]


# ---- array sets ---------------------------------------------------------------------------------------------


def write_svhn(root: Path, n: dict[str, int] = {"train": 7, "test": 3}) -> dict[str, np.ndarray]:
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    digits = {}
    for split, count in n.items():
        digits[split] = RNG.integers(0, 10, count)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": RNG.integers(0, 256, (32, 32, 3, count), dtype=np.uint8),
                                                        "y": np.where(digits[split] == 0, 10, digits[split])[:, None]})
    return digits


def write_stl10(root: Path) -> dict[str, np.ndarray]:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    labels = {}
    for split, count in (("train", 4), ("test", 2)):
        RNG.integers(0, 256, count * 3 * 96 * 96, dtype=np.uint8).tofile(base / f"{split}_X.bin")
        labels[split] = RNG.integers(0, 10, count)
        (labels[split] + 1).astype(np.uint8).tofile(base / f"{split}_y.bin")
    return labels


def write_pcam(root: Path, chunked: bool) -> dict[str, np.ndarray]:
    import h5py

    base = root / "pcam"
    base.mkdir(parents=True)
    labels = {}
    for split, count in (("train", 4), ("valid", 2), ("test", 3)):
        labels[split] = RNG.integers(0, 2, count)
        options = {"chunks": True, "compression": "gzip"} if chunked else {}
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f.create_dataset("x", data=RNG.integers(0, 256, (count, 96, 96, 3), dtype=np.uint8), **options)
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=labels[split].astype(np.uint8).reshape(-1, 1, 1, 1), **options)
    return labels


def torchvision_rows(kind: str, root: Path, split: str, monkeypatch) -> tuple[np.ndarray, list[int]]:
    """torchvision's own class reading the same files: every (image, label), decoded one by one."""
    import torchvision.datasets

    if kind in ("svhn", "stl10"):
        no_md5(monkeypatch, kind)
    name = {"svhn": "SVHN", "stl10": "STL10", "pcam": "PCAM"}[kind]
    tv = getattr(torchvision.datasets, name)(str(root), split=split)
    pairs = [tv[i] for i in range(len(tv))]
    return np.stack([np.asarray(img.convert("RGB")) for img, _ in pairs]), [y for _, y in pairs]


@pytest.mark.parametrize("kind, layout", [("svhn", "svhn"), ("stl10", "stl10"), ("pcam", "contiguous"), ("pcam", "gzip")])
def test_array_sets_equal_torchvisions_images_and_labels(tmp_path, monkeypatch, kind, layout):
    written = {"svhn": write_svhn, "stl10": write_stl10,
               "pcam": lambda root: write_pcam(root, chunked=layout == "gzip")}[kind](tmp_path)
    dataset = open_dataset(tmp_path, kind, splits=None)
    assert open_dataset(tmp_path).kind == kind
    assert tuple(dataset.splits) == (("train", "val", "test") if kind == "pcam" else ("train", "test"))
    assert len(dataset.classes) == (2 if kind == "pcam" else 10)
    for split, got in dataset.splits.items():
        images, labels = torchvision_rows(kind, tmp_path, split, monkeypatch)
        assert got.images.dtype == np.uint8 and got.images.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(got.images, images)
        assert got.labels.tolist() == labels == written[{"val": "valid"}.get(split, split) if kind == "pcam" else split].tolist()
    if layout == "contiguous":
        assert isinstance(dataset.splits["train"].images, np.memmap)  # PCAM's 7 GB train split is not read in


def test_array_sets_limit_splits_and_attributes(tmp_path):
    write_svhn(tmp_path, {"train": 30, "test": 12})
    out = tmp_path / "c.h5"
    build_cache(CacheOptions(data=str(tmp_path), dataset="svhn", out=str(out), weights="none", image_size=32, resize=32,
                             device="cpu", progress=False, loader="torch", amp=False, limit=10, splits=("train",)))
    cache = read_cache(out, splits=None)
    assert set(cache.features) == {"train"} and len(cache.labels["train"]) == 10
    assert cache.attrs["dataset"] == "svhn" and cache.attrs["dataset_source"].startswith("train_32x32.mat:")
    assert json.loads(cache.attrs["classes"]) == [str(i) for i in range(10)]


def test_resume_refuses_a_replaced_array_file(tmp_path, monkeypatch):

    write_svhn(tmp_path, {"train": 6, "test": 2})
    opts = CacheOptions(data=str(tmp_path), dataset="svhn", out=str(tmp_path / "c.h5"), weights="none", image_size=32,
                        resize=32, device="cpu", progress=False, loader="torch", amp=False, batch_size=2)
    interrupt_cache(monkeypatch, lambda: build_cache(opts), lambda split, start: split == "train" and start == 2)
    import scipy.io

    mat = scipy.io.loadmat(tmp_path / "train_32x32.mat")  # the same labels, other pixels
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": 255 - mat["X"], "y": mat["y"]})
    with pytest.raises(InputError, match="cannot resume .*different dataset_source"):
        build_cache(CacheOptions(**{**opts.__dict__, "resume": True}))


def test_gtsrb_ppm_files_cache_with_the_torch_loader(tmp_path, monkeypatch):
    from fastfeat.torch_loader import decode_file

    base, rows = gtsrb(tmp_path, monkeypatch)
    ppm = base / rows["train"][0][0]
    np.testing.assert_array_equal(decode_file(str(ppm)).permute(1, 2, 0).numpy(), np.asarray(Image.open(ppm)))
    out = tmp_path / "c.h5"
    build_cache(CacheOptions(data=str(tmp_path), dataset="gtsrb", out=str(out), weights="none", image_size=32, resize=32,
                             device="cpu", progress=False, loader="torch", amp=False))
    cache = read_cache(out)
    assert cache.labels["test"].tolist() == [1, 0] and cache.files["test"][0].endswith("Images/00001.ppm")


# ---- one line for bad input --------------------------------------------------------------------------------


def bad_stl10(root: Path) -> None:
    write_stl10(root)
    (root / "stl10_binary" / "test_X.bin").write_bytes(b"\0" * 100)


def svhn_label_11(root: Path) -> None:
    import scipy.io

    write_svhn(root)
    scipy.io.savemat(root / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[3], [11]])})


@pytest.mark.parametrize("kind, damage, expected", [
    ("svhn", lambda root: write_svhn(root, {"train": 3}), "missing SVHN file .*test_32x32.mat \\(--download fetches it\\)"),
    ("svhn", lambda root: (write_svhn(root), (root / "test_32x32.mat").write_bytes(b"junk")), "unreadable SVHN file"),
    ("svhn", svhn_label_11, "test_32x32.mat \\(test\\): label 11 \\(row 1\\) is outside the 10 classes"),
    ("stl10", bad_stl10, "test_X.bin is not a whole number of 3x96x96 images"),
    ("pcam", lambda root: (write_pcam(root, False), (root / "pcam" / "camelyonpatch_level_2_split_test_y.h5").unlink()),
     "missing PCAM file"),
    ("flowers102", lambda root: (root / "flowers-102").mkdir(), "not a readable Flowers102 \\(Dataset not found"),
    ("caltech101", lambda root: None, "caltech101: not a readable Caltech101 \\(no such folder; --download"),
])
def test_bad_zoo_input_is_one_line(tmp_path, capsys, kind, damage, expected):
    import re

    damage(tmp_path)
    code, err = cache_error(capsys, "--data", str(tmp_path), "--dataset", kind, "--out", str(tmp_path / "c.h5"))
    assert code == 2 and len(err) == 1 and re.search(expected, err[0]), err
    assert not (tmp_path / "caltech101").exists() and not (tmp_path / "c.h5").exists()


def test_every_zoo_set_is_a_kind_and_an_offline_download_says_what_to_do(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision.datasets

    assert {"flowers102", "food101", "stanford_cars", "fgvc_aircraft", "caltech101", "sun397", "stl10", "svhn",
            "eurosat", "gtsrb", "country211", "pcam"} <= set(KINDS)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "SVHN", offline)
    code, err = cache_error(capsys, "--data", str(tmp_path / "s"), "--dataset", "svhn", "--download",
                            "--out", str(tmp_path / "c.h5"))
    assert code == 2 and len(err) == 1 and "could not download SVHN" in err[0] and "name resolution" in err[0], err
    assert "fetch it elsewhere and unpack it so that" in err[0] and "train_32x32.mat" in err[0], err
