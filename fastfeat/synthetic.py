"""Generated CIFAR-like images, written in CIFAR-10's (or CIFAR-100's) python layout, as image class folders
and as WebDataset shards of those folders.

Tests and benchmarks must run on a machine with no dataset and no network, so they generate one:
smooth, textured 32x32 images whose class shows in a base colour and an oriented stripe texture
(orientation and frequency depend on the class), made harder by per-image colour, brightness, contrast
and orientation jitter, random blobs and noise. A random-init resnet18 with a linear probe learns
them well above chance, but not perfectly, so accuracy comparisons stay meaningful.

`write_sample` writes both layouts of the same images, like the real CIFAR-10 sample:
`root/cifar-10-batches-py/` (pickles) and `root/folder/{train,test}/<class>/<name>.jpg`, where each
pickle row's `filenames` entry names its file and holds exactly the pixels that decoding it gives.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
TRAIN_BATCHES = 5
CIFAR_SIZE = 32
_CLASS_SEED = 20240229  # class appearance depends only on the number of classes, never on `seed`
_CHUNK_PIXELS = 1 << 22  # pixels rendered at a time (about 50 MB per float32 RGB temporary)


@dataclass(frozen=True)
class ImageSet:
    """One split's rows: `images` (N, H, W, 3) uint8, `labels` (N,) int64, `names` the file name of
    each row (e.g. "cat_0003.jpg"), which is also its pickle `filenames` entry."""

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def make_images(n_per_class: int, classes: int = 10, size: int = 32,
                seed: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n_per_class` images of each of `classes` classes, rows in a seeded shuffle.

    Returns (images (N, size, size, 3) uint8, labels (N,) int64). The classes look the same whatever
    `seed` (anything `np.random.default_rng` takes), so a train and a test set drawn with two seeds
    share their classes."""
    if n_per_class < 1 or classes < 1 or size < 1:
        raise ValueError(f"need n_per_class, classes and size >= 1, got {n_per_class}, {classes}, {size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(classes, dtype=np.int64), n_per_class))
    params = _image_params(labels, classes, rng)
    images = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, len(labels), chunk):
        rows = slice(start, start + chunk)
        images[rows] = _render({k: v[rows] for k, v in params.items()}, size, rng)
    return images, labels


def _class_params(classes: int) -> dict[str, np.ndarray]:
    """Each class's appearance: evenly spaced base hues; stripe orientations, frequencies and second
    colours drawn independently of the hue, so no single cue separates every class."""
    rng = np.random.default_rng(_CLASS_SEED + classes)
    return {
        "hue": np.arange(classes) / classes,
        "angle": np.pi * rng.permutation(classes) / classes,
        "freq": 1.5 + 3.0 * rng.permutation(classes) / classes,  # stripe cycles across the image
        "hue_offset": 0.2 + 0.6 * rng.random(classes),  # the stripes' second colour, relative to the base
    }


def _image_params(labels: np.ndarray, classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-image appearance: the class's, jittered, plus random phase, blobs and brightness."""
    n, c = len(labels), _class_params(classes)
    hue = c["hue"][labels] + rng.normal(0, 0.02, n)
    blobs = 2
    return {
        "colour_a": _hsv_to_rgb(hue, rng.uniform(0.6, 0.9, n), rng.uniform(0.6, 0.9, n)),
        "colour_b": _hsv_to_rgb(hue + c["hue_offset"][labels], rng.uniform(0.2, 0.8, n), rng.uniform(0.2, 0.9, n)),
        "angle": c["angle"][labels] + rng.normal(0, 0.08, n),
        "freq": c["freq"][labels] * rng.uniform(0.85, 1.15, n),
        "phase": rng.uniform(0, 2 * np.pi, n),
        "contrast": rng.uniform(0.6, 1.0, n),
        "blob_centre": rng.uniform(0, 1, (n, blobs, 2)),
        "blob_sigma": rng.uniform(0.08, 0.25, (n, blobs)),
        "blob_colour": rng.uniform(0, 1, (n, blobs, 3)),
        "blob_alpha": rng.uniform(0.15, 0.5, (n, blobs)),
        "gain": rng.uniform(0.85, 1.15, n),
    }


def _render(p: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Images from their parameters, all at once: (n, size, size, 3) uint8."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = coords[None, :, None], coords[None, None, :]  # broadcast against (n, 1, 1) parameters

    def col(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)[:, None, None]

    along = x * col(np.cos(p["angle"])) + y * col(np.sin(p["angle"]))
    wave = np.sin(2 * np.pi * col(p["freq"]) * along + col(p["phase"]))
    t = (0.5 + 0.5 * col(p["contrast"]) * wave)[..., None]  # (n, H, W, 1): how much of colour_b
    img = p["colour_a"].astype(np.float32)[:, None, None] * (1 - t) + p["colour_b"].astype(np.float32)[:, None, None] * t
    for k in range(p["blob_centre"].shape[1]):
        d2 = (x - col(p["blob_centre"][:, k, 0])) ** 2 + (y - col(p["blob_centre"][:, k, 1])) ** 2
        g = (col(p["blob_alpha"][:, k]) * np.exp(-d2 / (2 * col(p["blob_sigma"][:, k]) ** 2)))[..., None]
        img = img * (1 - g) + p["blob_colour"][:, k].astype(np.float32)[:, None, None] * g
    img = img * col(p["gain"])[..., None] + rng.normal(0, 0.025, img.shape).astype(np.float32)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB in [0, 1]; hue wraps around. (n,) arrays -> (n, 3)."""
    k = (np.array([5.0, 3.0, 1.0]) + (h[:, None] % 1.0) * 6) % 6
    return v[:, None] * (1 - s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))


def name_images(labels: np.ndarray, classes: Sequence[str], first: int = 0,
                formats: Sequence[str] = ("jpg",)) -> tuple[str, ...]:
    """File names "<class>_<NNNN>.<ext>", numbered per class in row order from `first`; the format
    cycles through `formats` within each class (e.g. ("jpg", "png") makes every other file a PNG)."""
    counts = np.zeros(len(classes), dtype=np.int64)
    names = []
    for label in labels.tolist():
        index = int(counts[label])
        counts[label] += 1
        names.append(f"{classes[label]}_{first + index:04d}.{formats[index % len(formats)]}")
    return tuple(names)


def make_split(n_per_class: int, classes: Sequence[str] = CIFAR10_CLASSES, first: int = 0,
               seed: int | Sequence[int] = 0, formats: Sequence[str] = ("jpg",), size: int = CIFAR_SIZE) -> ImageSet:
    """`make_images` with a file name for each row (see `name_images`)."""
    images, labels = make_images(n_per_class, len(classes), size, seed)
    return ImageSet(images, labels, name_images(labels, classes, first, formats))


def encode_decode(image: np.ndarray, suffix: str, quality: int = 95) -> tuple[bytes, np.ndarray]:
    """The file bytes of `image` in the format `suffix` names, and the pixels decoding them gives."""
    buffer = io.BytesIO()
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}[suffix.lower().lstrip(".")]
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as decoded:
        return data, np.asarray(decoded.convert("RGB"))


def write_folder(root: str | Path, train: ImageSet, test: ImageSet, classes: Sequence[str],
                 quality: int = 95) -> tuple[ImageSet, ImageSet]:
    """Write `root/{train,test}/<class>/<name>` (JPEG at `quality`, or PNG, as each name says).

    Returns the two sets with the pixels that decoding the files gives (a JPEG round trip changes
    them), which is what a pickle of the same images must hold for the two layouts to agree."""
    root = Path(root)
    decoded = []
    for split, images in (("train", train), ("test", test)):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        pixels = np.empty_like(images.images)
        for i, (image, label, name) in enumerate(zip(images.images, images.labels.tolist(), images.names)):
            data, pixels[i] = encode_decode(image, Path(name).suffix, quality)
            (root / split / classes[label] / name).write_bytes(data)
        decoded.append(replace(images, images=pixels))
    return decoded[0], decoded[1]


def write_shards(folder: str | Path, out: str | Path, per_shard: int, label: str = "cls") -> Path:
    """The images of `folder`/{train,test}/<class>/ as WebDataset shards `out/<split>/<split>-NNNNNN.tar` of
    `per_shard` samples, in the folder's row order (key NNNNNN, the image member keeping its suffix), the
    label an integer `.cls` member or the "label" field of a `.json` one (`label`: cls or json); and the
    class names in `out/classes.txt`. Returns `out`."""
    from .sources import read_folder

    out = Path(out)
    dataset = read_folder(Path(folder), ("train", "test"))
    for split in dataset.splits.values():
        (out / split.name).mkdir(parents=True, exist_ok=True)
        rows = list(zip(split.files, split.labels.tolist()))
        for first in range(0, len(rows), per_shard):
            with tarfile.open(out / split.name / f"{split.name}-{first // per_shard:06d}.tar", "w") as tar:
                for key, (path, y) in enumerate(rows[first : first + per_shard], first):
                    tar.add(path, f"{key:06d}{Path(path).suffix}")
                    value = str(y) if label == "cls" else json.dumps({"label": y})
                    add_member(tar, f"{key:06d}.{label}", value.encode())
    (out / "classes.txt").write_text("\n".join(dataset.classes) + "\n")
    return out


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _cifar_base(root: str | Path, folder: str, title: str, *sets: ImageSet) -> Path:
    """`root/folder`, created, once every set is checked to hold 32x32 RGB images."""
    for images in sets:
        if images.images.shape[1:] != (CIFAR_SIZE, CIFAR_SIZE, 3):
            raise ValueError(f"the {title} layout holds 32x32 RGB images, got {images.images.shape[1:]}")
    base = Path(root) / folder
    base.mkdir(parents=True, exist_ok=True)
    return base


def _cifar_batch(images: ImageSet, rows: np.ndarray, batch_label: str, labels: dict[bytes, np.ndarray]) -> dict:
    """One official batch dict of `rows` of `images`: `labels` maps each label key to every row's label;
    `data` is (N, 3072) uint8, the red, then green, then blue 32x32 planes row-major."""
    return {
        b"batch_label": batch_label.encode(),
        **{key: values[rows].tolist() for key, values in labels.items()},
        b"data": np.ascontiguousarray(images.images[rows].transpose(0, 3, 1, 2).reshape(len(rows), -1)),
        b"filenames": [images.names[i].encode() for i in rows.tolist()],
    }


def _write_pickle(path: Path, value: dict) -> None:
    """A protocol-2 pickle, like the official (python 2) release files."""
    path.write_bytes(pickle.dumps(value, protocol=2))


def write_cifar10(root: str | Path, train: ImageSet, test: ImageSet, classes: Sequence[str]) -> Path:
    """Write `root/cifar-10-batches-py/` in the official python layout: `data_batch_1..5` (train rows
    split evenly, in order), `test_batch` and `batches.meta`, protocol-2 pickles of dicts with bytes
    keys; `data` is (N, 3072) uint8, the red, then green, then blue 32x32 planes row-major."""
    base = _cifar_base(root, CIFAR_DIR, "CIFAR-10", train, test)
    batches = {f"data_batch_{i + 1}": rows for i, rows in enumerate(np.array_split(np.arange(len(train)), TRAIN_BATCHES))}
    files = [(name, train, rows, f"training batch {i + 1} of {TRAIN_BATCHES}") for i, (name, rows) in enumerate(batches.items())]
    files.append(("test_batch", test, np.arange(len(test)), "testing batch 1 of 1"))
    for name, images, rows, label in files:
        _write_pickle(base / name, _cifar_batch(images, rows, label, {b"labels": images.labels}))
    meta = {b"label_names": [c.encode() for c in classes], b"num_cases_per_batch": math.ceil(len(train) / TRAIN_BATCHES),
            b"num_vis": 3 * CIFAR_SIZE * CIFAR_SIZE}
    _write_pickle(base / "batches.meta", meta)
    return base


def write_cifar100(root: str | Path, train: ImageSet, test: ImageSet, classes: Sequence[str],
                   coarse: Sequence[int] | None = None, coarse_classes: Sequence[str] | None = None) -> Path:
    """Write `root/cifar-100-python/` in the official python layout: `train`, `test` (rows in order) and
    `meta`, protocol-2 pickles like CIFAR-10's, with `fine_labels` (the images' labels, naming `classes`)
    and `coarse_labels` (`coarse[fine]`, default fine // 5: 20 superclasses of 5 for 100 classes) in
    place of `labels`; `meta` holds `fine_label_names` and `coarse_label_names` (default "superclassNN")."""
    coarse = np.asarray([i // 5 for i in range(len(classes))] if coarse is None else coarse, dtype=np.int64)
    if len(coarse) != len(classes):
        raise ValueError(f"coarse has {len(coarse)} entries for {len(classes)} classes")
    if coarse_classes is None:
        coarse_classes = [f"superclass{j:02d}" for j in range(int(coarse.max()) + 1)]
    base = _cifar_base(root, CIFAR100_DIR, "CIFAR-100", train, test)
    for name, images, label in (("train", train, "training batch 1 of 1"), ("test", test, "testing batch 1 of 1")):
        labels = {b"fine_labels": images.labels, b"coarse_labels": coarse[images.labels]}
        _write_pickle(base / name, _cifar_batch(images, np.arange(len(images)), label, labels))
    _write_pickle(base / "meta", {b"fine_label_names": [c.encode() for c in classes],
                                  b"coarse_label_names": [c.encode() for c in coarse_classes]})
    return base


def write_sample(root: str | Path, n_train_per_class: int = 100, n_test_per_class: int = 50, *,
                 classes: Sequence[str] = CIFAR10_CLASSES, seed: int = 0, formats: Sequence[str] = ("jpg",),
                 quality: int = 95) -> Path:
    """Write a generated sample in both layouts of the same images, like the real CIFAR-10 sample:
    `root/cifar-10-batches-py/` and `root/folder/{train,test}/<class>/`. Test files are numbered on
    from the train ones, so every name is unique. Returns `root`."""
    root = Path(root)
    train = make_split(n_train_per_class, classes, 0, (seed, 0), formats)
    test = make_split(n_test_per_class, classes, n_train_per_class, (seed, 1), formats)
    train, test = write_folder(root / "folder", train, test, classes, quality)
    write_cifar10(root, train, test, classes)
    return root


def data_or_sample(data: str | Path | None, train_images: int, workdir: str | Path,
                   test_images: int | None = None) -> tuple[Path, str]:
    """`data` as given, or a generated CIFAR-10 sample under `workdir` holding at least `train_images`
    train images (and `test_images` test ones; default a fifth as many): for benchmarks, which must
    run where no dataset is. Also returns a line saying which data it is."""
    if data is not None:
        return Path(data), str(data)
    classes = len(CIFAR10_CLASSES)
    n_train = max(1, math.ceil(train_images / classes))
    n_test = max(1, math.ceil((test_images if test_images is not None else train_images / 5) / classes))
    root = write_sample(Path(workdir) / "generated-cifar10", n_train, n_test)
    return root, f"generated: {classes * (n_train + n_test)} CIFAR-like images ({classes * n_train} train, {classes * n_test} test)"
