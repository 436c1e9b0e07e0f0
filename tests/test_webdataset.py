"""WebDataset shards: the same features as the folder and the list they hold, with both loaders; patterns,
indexes (DALI's own wds2idx as the reference), one-line errors, --resume, torchrun."""
from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LOADERS, TINY, cache_error, cache_rows, interrupt_cache, make_folder, torchrun, write_list

from fastfeat.cache import CacheOptions, build_cache
from fastfeat.cache_file import read_cache
from fastfeat.errors import InputError
from fastfeat.loaders import eval_batches
from fastfeat.sources import open_dataset
from fastfeat.sources.webdataset import expand_braces, index_paths
from fastfeat.synthetic import add_member, write_shards
from fastfeat.transforms import Preprocess

OPTS = dict(weights="none", image_size=32, resize=36, device="cpu", progress=False, amp=False, dtype="float32",
            batch_size=4, compile=False)


@pytest.fixture
def shards(tmp_path) -> tuple[Path, Path]:
    """(a folder of mixed-size jpg/png images, the same images as shards of 3 samples with .cls labels)."""
    folder = make_folder(tmp_path / "f", per_class=4)
    return folder, write_shards(folder, tmp_path / "w", per_shard=3)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_brace_patterns_expand_like_the_shell():
    assert expand_braces("d/s-{000..002}.tar") == ["d/s-000.tar", "d/s-001.tar", "d/s-002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]


@pytest.mark.parametrize("loader", LOADERS)
def test_shards_cache_the_same_features_as_their_folder_and_list(tmp_path, shards, loader):
    folder, wds = shards
    json_shards = write_shards(folder, tmp_path / "j", per_shard=5, label="json")  # labels in a json field
    for split in ("train", "test"):
        write_list(folder, f"{split}.csv", split=split)
    runs = {
        "folder": dict(data=str(folder), dataset="folder"),
        "list": dict(data=str(folder), dataset="list"),
        "shards": dict(data=str(wds)),  # <split>/*.tar, detected
        "patterns": dict(data=str(json_shards / "train" / "train-{000000..000001}.tar"), label_key="label",
                         test_data=str(json_shards / "test" / "*.tar")),
    }
    caches = {}
    for name, source in runs.items():
        build_cache(CacheOptions(**source, out=str(tmp_path / f"{name}.h5"), loader=loader, **OPTS))
        caches[name] = read_cache(tmp_path / f"{name}.h5")
    for name in ("list", "shards", "patterns"):
        for split in ("train", "test"):
            a, b = caches["folder"].features[split], caches[name].features[split]
            assert a.shape == b.shape == (8, 512) and cosines(a, b).min() >= 0.999, (name, split)
            np.testing.assert_array_equal(caches["folder"].labels[split], caches[name].labels[split])
    attrs = caches["patterns"].attrs
    assert attrs["dataset"] == "webdataset" and attrs["dataset_path"] == str(json_shards.resolve())
    assert attrs["dataset_source"] == "train=train/train-{000000..000001}.tar;test=test/*.tar"
    assert caches["shards"].files["train"][:4] == ["train/train-000000.tar/000000", "train/train-000000.tar/000001",
                                                   "train/train-000000.tar/000002", "train/train-000001.tar/000003"]
    assert caches["shards"].attrs["dataset_sha256"] != caches["folder"].attrs["dataset_sha256"]


@pytest.mark.parametrize("loader", LOADERS)
def test_a_limit_and_any_row_order_read_the_same_images_as_the_folder(shards, loader):
    folder, wds = shards
    for limit in (None, 5):  # 5 of 8: part of some shards (DALI: an index of just those samples)
        a, b = (open_dataset(root, kind, ("train",), limit).splits["train"] for root, kind in ((folder, "folder"), (wds, "auto")))
        np.testing.assert_array_equal(a.labels, b.labels)
        for order in (None, np.random.default_rng(1).permutation(len(a))):  # a shuffle, as fine-tuning reads
            pre = Preprocess(image_size=32, resize=36)
            x, y = (torch.cat(list(eval_batches(s, loader, pre, 3, torch.device("cpu"), order))) for s in (a, b))
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_index_files_are_dalis_own_format_kept_and_remade_when_stale(shards):
    wds2idx = pytest.importorskip("wds2idx")  # DALI's index maker: the reference
    _, wds = shards
    open_dataset(wds)
    shard = wds / "train" / "train-000000.tar"
    kept, _ = index_paths(shard)
    assert kept == wds / "train" / "train-000000.idx" and kept.is_file()
    reference = shard.with_suffix(".ref")
    with wds2idx.IndexCreator(str(shard), str(reference), verbose=False) as creator:
        creator.create_index()
    assert kept.read_text() == reference.read_text()
    stamp = kept.stat().st_mtime_ns
    open_dataset(wds)
    assert kept.stat().st_mtime_ns == stamp  # reused, not rescanned

    with tarfile.open(shard, "w") as tar:  # the shard rewritten: one sample fewer
        for key in ("000000", "000001"):
            add_member(tar, f"{key}.png", (wds.parent / "f" / "train" / "cat" / "1.png").read_bytes())
            add_member(tar, f"{key}.cls", b"1")
    dataset = open_dataset(wds)
    assert dataset.splits["train"].labels[:3].tolist() == [1, 1, 0] and len(dataset.splits["train"]) == 7
    assert kept.read_text().startswith("v1.2 2\n")


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            add_member(tar, name, data)


@pytest.mark.parametrize("case, expected", [
    ("missing shard", "missing shard: .*train-000003.tar \\(and 6 more of the 10 that .*names\\)"),
    ("no match", "no shards match .*nope-\\*.tar"),
    ("truncated", "train-000001.tar: truncated tar"),
    ("cut after a member", "train-000001.tar: truncated tar"),
    ("not a tar", "train-000001.tar: not a readable tar"),
    ("no label", "train-000001.tar/000099: no label \\(neither a .cls member nor a .json one\\)"),
    ("no image", "train-000001.tar/000099: no jpg/jpeg/png/webp image"),
    ("label outside", "train-000001.tar/000099: label '7' is not one of the 2 classes of .*w"),
    ("label key elsewhere", "--label-key apply to --dataset webdataset, not folder"),
])
def test_bad_shards_are_one_line(tmp_path, capsys, shards, case, expected):
    folder, wds = shards
    train = wds / "train"
    open_dataset(wds)  # indexes kept: a broken shard must not hide behind its old index
    image = (folder / "train" / "cat" / "0.jpg").read_bytes()
    bad = train / "train-000001.tar"
    data = ["--data", str(wds)]
    if case == "missing shard":
        data = ["--data", str(train / "train-{000000..000009}.tar"), "--test-data", str(wds / "test" / "*.tar")]
    elif case == "no match":
        data = ["--data", str(train / "nope-*.tar")]
    elif case == "truncated":
        bad.write_bytes(bad.read_bytes()[:1800])
    elif case == "cut after a member":  # every member whole, the end-of-archive blocks gone
        with tarfile.open(bad) as tar:
            tar.getmembers()
            end = tar.offset
        bad.write_bytes(bad.read_bytes()[:end])
    elif case == "not a tar":
        bad.write_bytes(b"not a tar at all" * 100)
    else:
        members = {"no label": {"000099.jpg": image}, "no image": {"000099.cls": b"0", "000099.txt": b"a cat"},
                   "label outside": {"000099.jpg": image, "000099.cls": b"7"}}.get(case, {"000099.jpg": image})
        write_tar(bad, members)
    if case == "label key elsewhere":
        data = ["--data", str(folder), "--dataset", "folder", "--label-key", "label"]
    code, err = cache_error(capsys, *data, "--out", str(tmp_path / "c.h5"))
    assert code == 2 and len(err) == 1 and err[0].startswith("fastfeat cache: error: "), err
    assert re.search(expected, err[0]), err
    assert not (tmp_path / "c.h5").exists()


def test_resume_refuses_changed_shards(tmp_path, monkeypatch, shards):
    _, wds = shards
    opts = CacheOptions(data=str(wds), out=str(tmp_path / "c.h5"), loader="torch", **OPTS)
    interrupt_cache(monkeypatch, lambda: build_cache(opts), lambda split, start: split == "train" and start == 4)
    shard = wds / "train" / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    write_tar(shard, {**members, "000000.cls": b"1"})  # one label changed
    with pytest.raises(InputError, match="cannot resume .*different dataset_sha256"):
        build_cache(CacheOptions(**{**opts.__dict__, "resume": True}))


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_two_rank_cache_of_shards_equals_one_rank_cache(tmp_path, loader):
    folder = make_folder(tmp_path / "f", per_class=7)
    wds = write_shards(folder, tmp_path / "w", per_shard=4)  # 14 rows a split: ranks split shard 1 (rows 4..7)
    common = ["cache", "--data", str(wds), *TINY, "--no-progress", "--no-amp", "--dtype", "float32", "--batch-size", "4",
              "--loader", loader]
    two = torchrun(*common, "--out", str(tmp_path / "two.h5"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "fastfeat", *common, "--out", str(tmp_path / "one.h5")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = cache_rows(tmp_path / "two.h5"), cache_rows(tmp_path / "one.h5")
    for key in b:
        if key.endswith("files"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert b["train/files"][4].decode() == "train/train-000001.tar/000004"
