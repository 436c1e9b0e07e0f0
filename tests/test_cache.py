"""fastfeat cache: preprocessing equals the recipe's, rows keep dataset order, files are safe."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from helpers import (CPU_AMP, LOADERS, MEAN, STD, assert_same_features, cpu_flag_precisions, error_lines, fastfeat,
                     fastfeat_here, interrupt_cache)
from PIL import Image

from fastfeat import CacheOptions, InputError, build_cache, open_dataset, read_cache
from fastfeat.backbone import build_backbone
from fastfeat.cache_file import CacheWriter, partial_path
from fastfeat.cli import main
from fastfeat.loaders import dali_available
from fastfeat.transforms import Preprocess, eval_transform

SMALL = dict(image_size=64, resize=73)  # the 224/256 ratio at a size that keeps tests fast


def cache(data, out, **kw) -> dict:
    """Build a cache on the CPU and return its arrays."""
    opts = CacheOptions(data=str(data), out=str(out), device="cpu", progress=False, **kw)
    build_cache(opts)
    c = read_cache(out, splits=opts.splits)
    return {"attrs": c.attrs, "files": c.files, **{f"{s}_x": torch.from_numpy(c.features[s]) for s in c.features},
            **{f"{s}_y": c.labels[s] for s in c.labels}}


def reference_features(images: list[Image.Image], weights_file) -> torch.Tensor:
    """The original recipe: PIL Resize(256), CenterCrop(224), ToTensor, Normalize, fp32 resnet18."""
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights_file))
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        return model.eval()(torch.stack([tf(im) for im in images]))


def check_224_features(data, weights_file, tmp_path, loader: str, n: int = 24) -> None:
    """`n` test images of `data` cached at 224 px give the recipe's PIL + fp32 features."""
    got = cache(data, tmp_path / "c.h5", splits=("test",), limit=n, loader=loader, weights=str(weights_file))
    split = open_dataset(data, splits=("test",), limit=n).splits["test"]
    images = ([Image.fromarray(a) for a in split.images] if split.images is not None
              else [Image.open(f).convert("RGB") for f in split.files])
    ref = reference_features(images, weights_file)
    assert got["test_x"].shape == (n, 512)
    np.testing.assert_array_equal(got["test_y"], split.labels)
    assert_same_features(got["test_x"], ref, ref.mean(0))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("layout", ["cifar10", "folder"])
def test_224_features_match_the_recipe_reference(sample, weights_file, tmp_path, loader, layout):
    check_224_features(sample if layout == "cifar10" else sample / "folder", weights_file, tmp_path, loader)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("layout", ["cifar10", "folder"])
def test_224_features_match_the_recipe_reference_on_real_images(real_sample, weights_file, tmp_path, loader, layout):
    check_224_features(real_sample if layout == "cifar10" else real_sample / "folder", weights_file, tmp_path, loader)


@pytest.mark.slow
def test_loaders_agree_and_folder_rows_map_to_pickle_rows(sample, weights_file, tmp_path):
    if not dali_available():
        pytest.skip("nvidia-dali not installed")
    kw = dict(splits=("train",), weights=str(weights_file), **SMALL)  # all 1,000 train images
    dali = cache(sample, tmp_path / "d.h5", loader="dali", **kw)
    torch_ = cache(sample, tmp_path / "t.h5", loader="torch", **kw)
    assert_same_features(dali["train_x"], torch_["train_x"], torch_["train_x"].mean(0))

    # The folder tree holds the same images as the pickles: row i of the folder cache is the
    # file folder.files[i]; the pickle's `filenames` says which pickle row holds that image.
    folder = cache(sample / "folder", tmp_path / "f.h5", loader="torch", **kw)
    files = open_dataset(sample / "folder", splits=("train",)).splits["train"].files
    row_of_name = {name.split("/")[-1]: i for i, name in enumerate(files)}
    names = [n.decode() for b in range(1, 6)
             for n in pickle.load(open(sample / "cifar-10-batches-py" / f"data_batch_{b}", "rb"), encoding="bytes")[b"filenames"]]
    rows = [row_of_name[n] for n in names]
    assert sorted(rows) == list(range(len(files))) and rows != sorted(rows)  # a shuffle of every file
    np.testing.assert_array_equal(folder["train_y"][rows], torch_["train_y"])
    assert_same_features(folder["train_x"][rows], torch_["train_x"], torch_["train_x"].mean(0), cos_min=0.995)


def test_rows_keep_dataset_order_and_labels(sample, weights_file, tmp_path):
    got = cache(sample, tmp_path / "c.h5", limit=700, loader="torch", weights="none", **SMALL)
    # --limit caps each split: 700 of the 1,000 train rows (the rows open_dataset picks), and the
    # whole 500-row test split, in the pickle's order.
    np.testing.assert_array_equal(got["train_y"], open_dataset(sample, splits=("train",), limit=700).splits["train"].labels)
    assert len(got["train_y"]) == 700
    test_labels = pickle.load(open(sample / "cifar-10-batches-py" / "test_batch", "rb"), encoding="bytes")[b"labels"]
    np.testing.assert_array_equal(got["test_y"], test_labels)
    assert len(got["test_y"]) == 500

    assert got["files"] == {}  # array rows map back by index alone

    folder = cache(sample / "folder", tmp_path / "f.h5", splits=("test",), loader="torch", weights="none", **SMALL)
    np.testing.assert_array_equal(folder["test_y"], np.repeat(np.arange(10), 50))
    # Each row records its image, relative to the dataset root: sorted class, then sorted file name.
    classes = json.loads(folder["attrs"]["classes"])
    expected = [f"test/{c}/{name}" for c in classes for name in sorted(os.listdir(sample / "folder" / "test" / c))]
    assert folder["files"]["test"] == expected
    assert [classes[y] for y in folder["test_y"]] == [f.split("/")[1] for f in folder["files"]["test"]]


def test_cache_is_self_describing(sample, weights_file, tmp_path):
    got = cache(sample, tmp_path / "c.h5", limit=40, loader="torch", weights=str(weights_file), dtype="float32", **SMALL)
    a = got["attrs"]
    spec = build_backbone("resnet18", str(weights_file)).spec
    assert a["complete"] is True and a["arch"] == "resnet18" and a["fastfeat_version"] and a["feature_dim"] == 512
    assert a["weights"] == "file:resnet18.pth" and a["weights_sha256"] == spec.weights_sha256
    assert a["interpolation"] == "bilinear"
    assert (a["image_size"], a["resize"], a["amp_dtype"], a["dataset"]) == (64, 73, CPU_AMP.name, "cifar10")
    assert a["precision_reason"] == CPU_AMP.reason
    # the default is a precision this machine runs natively (checked against the CPU's own flags, not the policy)
    assert a["amp_dtype"] in cpu_flag_precisions()
    assert np.allclose(a["mean"], MEAN) and np.allclose(a["std"], STD)
    assert json.loads(a["classes"])[:2] == ["airplane", "automobile"]
    assert json.loads(a["rows"]) == {"train": 40, "test": 40} and a["created"]
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["train/features"].dtype == np.float32 and f["train/labels"].dtype == np.int64
        assert f["train/features"].chunks[1] == 512


def test_resume_gives_the_same_file_as_an_uninterrupted_run(sample, tmp_path, monkeypatch):
    kw = dict(limit=100, loader="torch", weights="none", batch_size=16, **SMALL)
    whole = cache(sample, tmp_path / "whole.h5", **kw)

    out = tmp_path / "resumed.h5"
    calls = {"n": 0}
    real_write = CacheWriter.write

    def interrupted_write(self, *args):
        calls["n"] += 1
        if calls["n"] == 9:  # mid-way through the test split
            raise KeyboardInterrupt
        real_write(self, *args)

    monkeypatch.setattr(CacheWriter, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        cache(sample, out, **kw)
    assert partial_path(out).exists() and not out.exists()
    with pytest.raises(InputError, match="incomplete|does not exist"):
        read_cache(out)
    with pytest.raises(InputError, match="--resume"):
        cache(sample, out, **kw)
    monkeypatch.setattr(CacheWriter, "write", real_write)
    resumed = cache(sample, out, resume=True, **kw)
    assert not partial_path(out).exists()
    for key in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(resumed[key], whole[key])
    # A partial file started with other settings is never mixed into a new run.
    monkeypatch.setattr(CacheWriter, "write", interrupted_write)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        cache(sample, tmp_path / "other.h5", **kw)
    monkeypatch.setattr(CacheWriter, "write", real_write)
    with pytest.raises(InputError, match="different batch_size"):
        cache(sample, tmp_path / "other.h5", resume=True, **{**kw, "batch_size": 8})


def test_the_default_batch_size_is_the_devices(sample, tmp_path):
    """128 images a batch on a CPU, 1024 (a large GPU's) on CUDA, unless --batch-size says otherwise."""
    assert CacheOptions().batch(torch.device("cuda")) == 1024
    assert CacheOptions(batch_size=8).batch(torch.device("cuda")) == 8
    made = cache(sample, tmp_path / "c.h5", splits=("test",), limit=20, loader="torch", weights="none", **SMALL)
    assert made["attrs"]["batch_size"] == 128


def test_resume_refuses_a_folder_whose_files_changed(folder, tmp_path, monkeypatch):
    kw = dict(splits=("train",), loader="torch", weights="none", batch_size=2, image_size=32, resize=36)
    out = tmp_path / "c.h5"
    interrupt_cache(monkeypatch, lambda: cache(folder, out, **kw), lambda split, start: start >= 2)
    (folder / "train" / "cat" / "0.jpg").rename(folder / "train" / "cat" / "9.jpg")  # same count, other rows
    with pytest.raises(InputError, match="train image files differ"):
        cache(folder, out, resume=True, **kw)
    (folder / "train" / "cat" / "9.jpg").rename(folder / "train" / "cat" / "0.jpg")
    assert cache(folder, out, resume=True, **kw)["files"]["train"][0] == "train/cat/0.jpg"


def test_existing_cache_needs_overwrite(sample, tmp_path):
    kw = dict(splits=("test",), limit=10, loader="torch", weights="none", **SMALL)
    first = cache(sample, tmp_path / "c.h5", **kw)
    with pytest.raises(InputError, match="already exists"):
        cache(sample, tmp_path / "c.h5", **kw)
    again = cache(sample, tmp_path / "c.h5", overwrite=True, **{**kw, "seed": 1})
    assert not torch.equal(first["test_x"], again["test_x"])


def test_weights_files_with_prefixes_and_without_fc_load_the_same(weights_file, tmp_path):
    state = torch.load(weights_file)
    sha = build_backbone("resnet18", str(weights_file)).spec.weights_sha256
    variant = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}}, variant)
    assert build_backbone("resnet18", str(variant)).spec.weights_sha256 == sha
    assert build_backbone("resnet18", "none", seed=0).spec.weights_sha256 != sha


def test_torch_transform_matches_pil_on_non_square_images():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 411, 3), dtype=np.uint8)
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])(Image.fromarray(pixels))
    got = eval_transform(torch.from_numpy(pixels).permute(2, 0, 1)[None], Preprocess())[0]
    assert got.shape == ref.shape == (3, 224, 224)
    assert (got - ref).abs().max() <= 2 / 255 / min(STD) + 1e-6  # at most 2 grey levels off


def run_cli(*argv: str, capsys) -> tuple[int, str, str]:
    code = main(["cache", "--no-progress", "--device", "cpu", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def bad_weights(tmp_path):
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), wrong)
    return wrong


@pytest.mark.parametrize("case, expected", [
    ("missing data dir", "does not exist"),
    ("empty data dir", "neither"),
    ("empty class folders", "no .jpg"),
    ("mismatched class lists", "classes"),
    ("corrupt image torch", "corrupt image: .*bad.jpg"),
    ("corrupt image dali", "corrupt image: .*bad.jpg"),
    ("unreadable weights", "unreadable weights file"),
    ("mismatched weights", "not a resnet18 state dict"),
    ("missing weights", "does not exist"),
    ("unwritable output", "cannot write"),
    ("existing output", "already exists"),
    ("bad split", "unknown split"),
    ("bad device", "unknown device|no CUDA"),
])
def test_bad_input_is_one_line_and_leaves_no_complete_file(case, expected, folder, tmp_path, capsys):
    out = tmp_path / "out" / "c.h5"
    args = ["--data", str(folder), "--weights", "none", "--out", str(out), "--image-size", "32", "--resize", "36", "--loader", "torch"]
    if case == "missing data dir":
        args[1] = str(tmp_path / "nope")
    elif case == "empty data dir":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    elif case == "empty class folders":
        for f in (folder / "test").rglob("*.*"):
            f.unlink()
    elif case == "mismatched class lists":
        (folder / "test" / "bird").mkdir()
    elif case.startswith("corrupt image"):
        if case.endswith("dali") and not dali_available():
            pytest.skip("nvidia-dali not installed")
        (folder / "train" / "dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 20)
        args[-1] = case.split()[-1]
    elif case == "unreadable weights":
        (tmp_path / "w.pth").write_bytes(b"garbage")
        args[3] = str(tmp_path / "w.pth")
    elif case == "mismatched weights":
        args[3] = str(bad_weights(tmp_path))
    elif case == "missing weights":
        args[3] = str(tmp_path / "missing.pth")
    elif case == "unwritable output":
        (tmp_path / "file").write_text("")
        args[5] = str(tmp_path / "file" / "c.h5")
    elif case == "existing output":
        out.parent.mkdir()
        out.write_text("keep me")
    elif case == "bad split":
        args += ["--splits", "train,holdout"]
    elif case == "bad device":
        args += ["--device", "tpu" if torch.cuda.is_available() else "cuda"]
    code, _, err = run_cli(*args, capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip() and "[ERROR]" not in line]  # DALI's own C++ log
    assert code in (1, 2), err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(expected, lines[0]), lines[0]
    if case == "existing output":
        assert out.read_text() == "keep me"
    elif out.exists():
        pytest.fail(f"{out} was written despite the error")


def test_offline_downloads_fail_in_one_line(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as tv_utils
    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    code, _, err = run_cli("--data", str(tmp_path / "dl"), "--download", "--weights", "none", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "could not download CIFAR-10" in err and "cifar-10-batches-py" in err

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(InputError, match="--weights FILE .* --weights none"):
        build_backbone("resnet18", "imagenet")


@pytest.mark.slow
def test_console_script_end_to_end_with_metrics(sample, tmp_path):
    out, metrics = tmp_path / "c.h5", tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastfeat", "cache", "--data", str(sample), "--limit", "20", "--weights", "none",
         "--image-size", "32", "--resize", "36", "--device", "cpu", "--out", str(out), "--metrics", str(metrics)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cached 40 images" in proc.stdout and "img/s" in proc.stderr  # summary + tqdm bars
    m = json.loads(metrics.read_text())
    assert set(m) == {"command", "images", "views", "backbone_images", "seconds", "images_per_second", "loader", "device",
                      "precision", "precision_reason", "compiled", "ranks", "out"}
    assert m["views"] == 0 and m["backbone_images"] == 40  # no --tta, no --views: the center crops alone
    assert m["images"] == 40 and m["out"] == str(out) and m["precision"] == CPU_AMP.name and m["device"] == "cpu"
    assert m["compiled"] is False  # --compile auto: 40 images are far too few to pay back a compile


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_from_the_console_is_one_line(folder, tmp_path, loader, damage, capsys):
    """Under DALI in a real process: its decoder can crash (not raise) on broken files, so none reach it."""
    good = (folder / "train" / "dog" / "0.jpg").read_bytes()
    broken = b"\xff\xd8\xff\xe0garbage" * 10 if damage == "garbage" else good[: len(good) * 2 // 3]
    (folder / "train" / "dog" / "bad.jpg").write_bytes(broken)
    argv = ["cache", "--data", folder, "--weights", "none", "--loader", loader, "--image-size", "32", "--resize", "36",
            "--device", "cpu", "--no-progress", "--out", tmp_path / "c.h5"]
    proc = fastfeat(*argv) if loader == "dali" else fastfeat_here(capsys, *argv)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # Any lines before ours are DALI's own C++ decoder log; its threads are stopped before we print.
    assert proc.stderr.splitlines()[-1] == f"fastfeat cache: error: corrupt image: {folder / 'train' / 'dog' / 'bad.jpg'}"
    assert "\n".join(error_lines(proc.stderr)).count("fastfeat") == 1
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.slow
def test_compiled_backbone_gives_the_same_features(sample, weights_file, tmp_path):
    kw = dict(splits=("test",), limit=24, loader="torch", weights=str(weights_file), batch_size=16, image_size=32, resize=36)
    eager = cache(sample, tmp_path / "e.h5", **kw)
    compiled = cache(sample, tmp_path / "c.h5", compile=True, **kw)  # inductor, BatchNorm frozen into the convs
    assert_same_features(compiled["test_x"], eager["test_x"], eager["test_x"].mean(0))
