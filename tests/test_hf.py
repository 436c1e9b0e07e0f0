"""Hugging Face datasets: local save_to_disk and parquet directories written here (skipped without `datasets`)."""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import cache_error, interrupt_cache
from PIL import Image

from fastfeat.cache import CacheOptions, build_cache
from fastfeat.cache_file import read_cache
from fastfeat.errors import InputError
from fastfeat.sources import SourceInputs, open_dataset

datasets = pytest.importorskip("datasets")

CLASSES = ["cat", "dog", "eel"]
OPTS = dict(weights="none", image_size=32, resize=36, device="cpu", progress=False, loader="torch", amp=False,
            dtype="float32")


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def make_split(n: int, seed: int, label: str = "class") -> tuple[datasets.Dataset, np.ndarray, np.ndarray]:
    """n PNG images (one of them a JPEG) of varied sizes, labels cycling through every class."""
    rng = np.random.default_rng(seed)
    pixels = [rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8) for i in range(n)]
    labels = np.arange(n) % len(CLASSES)
    images = [{"bytes": encoded(p, "JPEG" if i == 1 else "PNG"), "path": None} for i, p in enumerate(pixels)]
    feature = datasets.ClassLabel(names=CLASSES) if label == "class" else datasets.Value("int64")
    features = datasets.Features({"id": datasets.Value("int64"), "picture": datasets.Image(), "y": feature})
    ds = datasets.Dataset.from_dict({"id": list(range(n)), "picture": images, "y": labels.tolist()}, features=features)
    return ds, pixels, labels


def save_dict(root: Path, sizes=(("train", 7), ("validation", 3), ("test", 4)), seed: int = 0) -> dict:
    made = {name: make_split(n, seed + i) for i, (name, n) in enumerate(sizes)}
    datasets.DatasetDict({name: ds for name, (ds, _, _) in made.items()}).save_to_disk(str(root))
    return made


def test_a_save_to_disk_directory_reads_its_splits_columns_and_class_names(tmp_path):
    made = save_dict(tmp_path / "d")
    dataset = open_dataset(tmp_path / "d", splits=None)  # --dataset auto finds it
    assert dataset.kind == "hf" and dataset.classes == tuple(CLASSES) and tuple(dataset.splits) == ("train", "val", "test")
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        _, pixels, labels = made[name]
        got = dataset.splits[split]
        np.testing.assert_array_equal(got.labels, labels)
        for i, (path, expected) in enumerate(zip(got.files, pixels)):
            decoded = np.asarray(Image.open(path).convert("RGB"))
            assert decoded.shape == expected.shape
            if i != 1:  # the JPEG is lossy
                np.testing.assert_array_equal(decoded, expected)
        assert Path(got.files[1]).suffix == ".jpg" and Path(got.files[0]).suffix == ".png"
    again = open_dataset(tmp_path / "d", "hf", splits=("test",))  # the written files are reused
    assert again.splits["test"].files == dataset.splits["test"].files


def test_a_hf_cache_equals_the_cache_of_the_same_images_in_a_folder(tmp_path):
    made = save_dict(tmp_path / "d", sizes=(("train", 6), ("test", 3)))
    for name, (_, pixels, labels) in made.items():
        for i, (p, y) in enumerate(zip(pixels, labels)):
            (tmp_path / "f" / name / CLASSES[y]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(p).save(tmp_path / "f" / name / CLASSES[y] / f"{i:02d}.png")
    build_cache(CacheOptions(data=str(tmp_path / "d"), dataset="hf", out=str(tmp_path / "hf.h5"), **OPTS))
    build_cache(CacheOptions(data=str(tmp_path / "f"), dataset="folder", out=str(tmp_path / "f.h5"), **OPTS))
    hf, folder = read_cache(tmp_path / "hf.h5"), read_cache(tmp_path / "f.h5")
    assert hf.attrs["dataset"] == "hf" and json.loads(hf.attrs["classes"]) == CLASSES
    for split, (_, pixels, labels) in made.items():
        order = np.argsort(labels, kind="stable")  # the folder lists class by class
        rows = [i for i in order if i != 1]  # the JPEG was written to the folder as PNG
        a, b = hf.features[split][rows], folder.features[split][[int(np.flatnonzero(order == i)[0]) for i in rows]]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= 0.999
        np.testing.assert_array_equal(hf.labels[split], labels)
        assert hf.files[split][0].startswith("hf-images/")


def test_a_parquet_directory_with_named_integer_columns(tmp_path, capsys):
    for name, n, seed in (("train", 6, 0), ("test", 3, 1)):
        ds, _, _ = make_split(n, seed, label="int")
        ds.to_parquet(str(tmp_path / "p" / f"{name}-00000-of-00001.parquet"))
    code, err = cache_error(capsys, "--data", str(tmp_path / "p"), "--dataset", "hf", "--out", str(tmp_path / "c.h5"))
    assert code == 2 and len(err) == 1 and re.search(r"no ClassLabel column \(columns: id \(Value\), picture \(Image\), "
                                                     r"y \(Value\)\): name it with --label-column", err[0]), err
    dataset = open_dataset(tmp_path / "p", "hf", limit=3, inputs=SourceInputs(columns=(None, "y")))
    assert dataset.classes == ("0", "1", "2") and [len(s) for s in dataset.splits.values()] == [3, 3]
    assert sorted(dataset.splits["train"].labels.tolist()) == [0, 1, 2]  # --limit: one of each class


def test_resume_refuses_a_changed_hf_dataset(tmp_path, monkeypatch):

    save_dict(tmp_path / "d", sizes=(("train", 6), ("test", 3)))
    opts = CacheOptions(data=str(tmp_path / "d"), dataset="hf", out=str(tmp_path / "c.h5"), batch_size=2,
                        **OPTS)
    interrupt_cache(monkeypatch, lambda: build_cache(opts), lambda split, start: split == "train" and start == 2)
    save_dict(tmp_path / "d2", sizes=(("train", 6), ("test", 3)), seed=5)  # the same labels, other images
    import shutil

    shutil.rmtree(tmp_path / "d" / "train")
    shutil.copytree(tmp_path / "d2" / "train", tmp_path / "d" / "train")
    with pytest.raises(InputError, match="cannot resume .*(different dataset_sha256|image files differ)"):
        build_cache(CacheOptions(**{**opts.__dict__, "resume": True}))


@pytest.mark.parametrize("case, expected", [
    ("no val", r"has no val split"),
    ("label -1", r"\(test, column 'y'\): label -1 \(row 0\) is outside the 3 classes"),
    ("no image column", r"no column 'pixels' \(columns: id, picture, y\)"),
    ("offline hub", r"could not load Hugging Face dataset nobody/none:cfg \(Couldn't reach .*\); offline, set "
                    r"HF_DATASETS_OFFLINE=1"),
    ("no datasets", r"need the `datasets` package: pip install 'fastfeat\[hf\]'"),
    ("not a dataset", r"could not load .* as a Hugging Face dataset"),
])
def test_bad_hf_input_is_one_line(tmp_path, capsys, monkeypatch, case, expected):
    save_dict(tmp_path / "d", sizes=(("train", 4), ("test", 2)))
    argv = ["--data", str(tmp_path / "d"), "--dataset", "hf", "--out", str(tmp_path / "c.h5")]
    if case == "no val":
        argv += ["--splits", "train,val"]
    if case == "label -1":
        ds, _, _ = make_split(2, 3, label="int")
        datasets.DatasetDict({"train": make_split(4, 0)[0], "test": ds.map(lambda r: {"y": r["y"] - 1})}).save_to_disk(
            str(tmp_path / "e"))
        argv = ["--data", str(tmp_path / "e"), "--dataset", "hf", "--label-column", "y", "--out", str(tmp_path / "c.h5")]
    if case == "no image column":
        argv += ["--image-column", "pixels"]
    if case == "offline hub":
        def offline(*args, **kwargs):
            raise ConnectionError("Couldn't reach 'nobody/none' on the Hub (LocalEntryNotFoundError)")
        monkeypatch.setattr(datasets, "load_dataset", offline)
        argv[3] = "hf:nobody/none:cfg"
    if case == "no datasets":
        monkeypatch.setitem(sys.modules, "datasets", None)
    if case == "not a dataset":
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "x.parquet").write_bytes(b"not parquet")
        argv[1] = str(tmp_path / "junk")
    code, err = cache_error(capsys, *argv)
    assert code == 2 and len(err) == 1 and re.search(expected, err[0]), err
    assert not (tmp_path / "c.h5").exists()
