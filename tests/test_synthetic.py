"""fastfeat.synthetic: generated CIFAR-like images in the official CIFAR-10 layout and as image folders."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from fastfeat.sources import open_dataset
from fastfeat.synthetic import CIFAR10_CLASSES, data_or_sample, make_images, write_sample


def test_images_are_balanced_shuffled_seeded_and_textured():
    images, labels = make_images(20, classes=10, size=32, seed=3)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [20] * 10 and (np.diff(labels) < 0).any()  # shuffled, not sorted
    again, again_labels = make_images(20, classes=10, size=32, seed=3)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    other, _ = make_images(20, classes=10, size=32, seed=4)
    assert not np.array_equal(images, other)
    assert images.reshape(200, -1, 3).std(axis=1).mean() > 15  # textured, not flat colour
    assert make_images(2, classes=3, size=48)[0].shape == (6, 48, 48, 3)


def test_classes_look_alike_across_seeds_and_differ_from_each_other():
    """Train and test sets are drawn with two seeds: a class must keep its look between them. Mean
    colour alone (a weak cue: stripes and jitter blur it) already tells the classes apart well above chance."""
    (train, train_y), (test, test_y) = (make_images(100, seed=seed) for seed in (0, 1))

    def colour(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1, 3).mean(axis=1)

    centres = np.stack([colour(train[train_y == c]).mean(axis=0) for c in range(10)])
    test_centres = np.stack([colour(test[test_y == c]).mean(axis=0) for c in range(10)])

    def nearest(x: np.ndarray) -> np.ndarray:
        return np.linalg.norm(x[:, None] - centres[None], axis=2).argmin(axis=1)

    assert nearest(test_centres).tolist() == list(range(10))
    accuracy = (nearest(colour(test)) == test_y).mean()
    assert 0.4 < accuracy < 0.9, accuracy


def test_sample_has_both_layouts_of_the_same_pixels(tmp_path):
    root = write_sample(tmp_path / "s", 7, 3, formats=("jpg", "png"))
    base = root / "cifar-10-batches-py"
    assert sorted(p.name for p in base.iterdir()) == ["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]
    meta = pickle.loads((base / "batches.meta").read_bytes())
    assert meta[b"label_names"] == [name.encode() for name in CIFAR10_CLASSES]
    sizes, names = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw = (base / name).read_bytes()
        assert raw[:2] == b"\x80\x02"  # protocol 2, like the official Python-2 pickles
        batch = pickle.loads(raw, encoding="bytes")
        data, labels, files = batch[b"data"], batch[b"labels"], batch[b"filenames"]
        assert data.dtype == np.uint8 and data.shape == (len(labels), 3072) and isinstance(labels, list)
        assert all(isinstance(f, bytes) for f in files) and len(files) == len(labels)
        split = "test" if name == "test_batch" else "train"
        for row, label, file in zip(data, labels, files):
            # the file decodes to exactly the pickle row: R plane, then G, then B, each 32x32 row-major
            pixels = np.asarray(Image.open(root / "folder" / split / CIFAR10_CLASSES[label] / file.decode()).convert("RGB"))
            assert np.array_equal(row.reshape(3, 32, 32).transpose(1, 2, 0), pixels), file
            assert file.decode().startswith(CIFAR10_CLASSES[label] + "_")
        sizes.append(len(labels))
        names += files
    assert sizes == [14] * 5 + [30] and len(set(names)) == len(names)  # train split evenly; names unique
    assert {n.decode().rsplit(".", 1)[1] for n in names} == {"jpg", "png"}

    cifar, folder = open_dataset(root), open_dataset(root / "folder")
    assert cifar.classes == folder.classes == CIFAR10_CLASSES
    for split, n in (("train", 70), ("test", 30)):
        assert len(cifar.splits[split]) == len(folder.splits[split]) == n
        assert np.bincount(cifar.splits[split].labels).tolist() == [n // 10] * 10


def test_data_or_sample_generates_only_without_data(tmp_path):
    assert data_or_sample("/some/dir", 100, tmp_path) == (Path("/some/dir"), "/some/dir")
    assert not list(tmp_path.iterdir())
    root, described = data_or_sample(None, 95, tmp_path)
    dataset = open_dataset(root)
    assert len(dataset.splits["train"]) == 100 and len(dataset.splits["test"]) == 20
    assert described == "generated: 120 CIFAR-like images (100 train, 20 test)"
