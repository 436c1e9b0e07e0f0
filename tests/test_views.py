"""Cached views: flips equal the features of flipped images, augmented views are seeded, the layout stays
readable, resume and torchrun joins keep views, train-head samples them and evaluates with the flip."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CLASSES, LOADERS, TINY, interrupt_cache, run, separable, torchrun, write_cache
from PIL import Image

from fastfeat import CacheOptions, InputError, build_cache, read_cache
from fastfeat.cache_file import describe_cache, partial_path
from fastfeat.head import HeadOptions, train_head
from fastfeat.knn import knn_predict
from fastfeat.loaders import dali_available
from fastfeat.model_files import load_head
from fastfeat.predict import Classifier, Predictor
from fastfeat.transforms import Preprocess
from fastfeat.views import ViewPlan, ViewSampler

CPU = dict(device="cpu", progress=False, weights="none", image_size=32, resize=36, amp=False, dtype="float32")


def png_folder(root: Path, mirrored: bool = False, per_class: int = 3) -> Path:
    """root/{train,test}/<class>/<i>.png: random 40 x 40 images (36 px after resize: equal crop margins),
    lossless so that a mirrored folder holds exactly the mirrored pixels."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels[:, ::-1] if mirrored else pixels).save(root / split / name / f"{i}.png")
    return root


def cache(data: Path, out: Path, **kw):
    opts = CacheOptions(data=str(data), out=str(out), **{**CPU, **kw})
    build_cache(opts)
    return read_cache(out, opts.splits, views=True)


@pytest.mark.parametrize("loader", LOADERS)
def test_flips_are_the_features_of_flipped_images_and_centers_do_not_change(tmp_path, loader):
    plain = cache(png_folder(tmp_path / "a"), tmp_path / "plain.h5", loader=loader)
    views = cache(tmp_path / "a", tmp_path / "views.h5", loader=loader, tta="flip", views=2, batch_size=4)
    mirrored = cache(png_folder(tmp_path / "m", mirrored=True), tmp_path / "m.h5", loader=loader)
    assert views.view_names == {"train": ["flip", "crop-flip", "crop-flip"], "test": ["flip"]}
    for split in ("train", "test"):
        np.testing.assert_allclose(views.features[split], plain.features[split], rtol=1e-5, atol=1e-5)
        flips = views.views[split][:, 0]
        # DALI's resize is not exactly mirror-symmetric: within 3e-3 there (features ~1), float rounding in torch
        np.testing.assert_allclose(flips, mirrored.features[split], atol=3e-3 if loader == "dali" else 1e-4)
        assert np.abs(flips - views.features[split]).max() > 0.05  # a different image


def test_augmented_views_are_seeded_distinct_and_the_same_from_either_loader(tmp_path):
    data = png_folder(tmp_path / "a")
    kw = dict(views=3, batch_size=4, splits=("train",))
    first = cache(data, tmp_path / "1.h5", loader="torch", **kw).views["train"]
    again = cache(data, tmp_path / "2.h5", loader="torch", **kw).views["train"]
    other = cache(data, tmp_path / "3.h5", loader="torch", view_seed=1, **kw).views["train"]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other, atol=1e-2)
    for a in range(3):
        for b in range(a):
            assert not np.allclose(first[:, a], first[:, b], atol=1e-2)
    if not dali_available():
        return
    dali = cache(data, tmp_path / "4.h5", loader="dali", **kw).views["train"]
    np.testing.assert_allclose(dali, first, rtol=1e-4, atol=1e-4)


def test_layout_is_readable_by_the_old_reader_and_described(tmp_path):
    out = tmp_path / "v.h5"
    full = cache(png_folder(tmp_path / "a"), out, loader="torch", tta="flip", views=1, view_seed=7)
    old = read_cache(out)  # today's reader: features and labels, no views
    assert old.views == {} and old.features["train"].shape == (6, 512)
    np.testing.assert_array_equal(old.features["train"], full.features["train"])
    with h5py.File(out) as f:
        assert f["train/views"].shape == (6, 2, 512) and f["train/views"].dtype == np.float32
        assert json.loads(f["train/views"].attrs["transforms"]) == ["flip", "crop-flip"]
        assert json.loads(f["train/views"].attrs["seeds"]) == [None, 7]
        assert f.attrs["tta"] == "flip" and f.attrs["views"] == 1
    info = describe_cache(out)["splits"]
    assert info["train"]["view_transforms"] == ["flip", "crop-flip"] and info["test"]["views"] == "(6, 1, 512) float32"


@pytest.mark.slow
def test_resume_keeps_views_and_refuses_other_view_settings(tmp_path, monkeypatch):
    data, kw = png_folder(tmp_path / "a", per_class=4), dict(loader="torch", tta="flip", views=2, batch_size=2)
    whole = cache(data, tmp_path / "whole.h5", **kw)
    out = tmp_path / "resumed.h5"
    interrupt_cache(monkeypatch, lambda: cache(data, out, **kw), lambda split, start: split == "train" and start >= 4)
    assert partial_path(out).exists()
    with pytest.raises(InputError, match="different views"):
        cache(data, out, resume=True, **{**kw, "views": 1})
    resumed = cache(data, out, resume=True, **kw)
    for split in ("train", "test"):
        np.testing.assert_array_equal(resumed.views[split], whole.views[split])
        np.testing.assert_array_equal(resumed.features[split], whole.features[split])


@pytest.mark.slow
def test_two_rank_join_keeps_views(tmp_path):
    data = png_folder(tmp_path / "a", per_class=3)  # 6 rows a split: each rank's 3 rows are one batch of 3
    common = ["cache", "--data", str(data), *TINY, "--no-progress", "--no-amp", "--dtype", "float32", "--batch-size", "3",
              "--tta", "flip", "--views", "1"]
    done = torchrun(*common, "--out", str(tmp_path / "two.h5"))
    assert done.returncode == 0, done.stderr
    single = subprocess.run([sys.executable, "-m", "fastfeat", *common, "--out", str(tmp_path / "one.h5")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    two, one = read_cache(tmp_path / "two.h5", views=True), read_cache(tmp_path / "one.h5", views=True)
    assert two.view_names == one.view_names == {"train": ["flip", "crop-flip"], "test": ["flip"]}
    for split in ("train", "test"):  # the batches, hence the views' seeds, are the same in both runs
        np.testing.assert_allclose(two.views[split], one.views[split], rtol=1e-4, atol=1e-5)


def views_cache(out: Path, n_views: int = 2, rows: int = 240) -> tuple[Path, dict]:
    """A cache of separable features whose views are noisy copies (train: flip + n_views, test: flip)."""
    rng = np.random.default_rng(0)
    splits = {"train": separable(rows, rng), "test": separable(rows // 2, rng)}
    names = {"train": ["flip"] + ["recipe"] * n_views, "test": ["flip"]}
    views = {s: (x[:, None] + rng.normal(0, 0.5, (len(x), len(names[s]), x.shape[1]))).astype(np.float16)
             for s, (x, _) in splits.items()}
    write_cache(out, splits, views={s: (names[s], views[s]) for s in splits})
    return out, {s: (x.astype(np.float32), y, views[s].astype(np.float32)) for s, (x, y) in splits.items()}


def test_train_head_reads_every_view_equally_and_trains_on_them(tmp_path, monkeypatch):
    path, _ = views_cache(tmp_path / "v.h5")
    reads, sampled, real_refresh, real_init = [], {}, ViewSampler.refresh, ViewSampler.__init__

    def init(self, center, views, names, seed):
        sampled.update(center=center.clone(), views=views.float())
        real_init(self, center, views, names, seed)

    def recorded(self, epoch):
        buffer = real_refresh(self, epoch)
        choice = self.choices(epoch)
        center, views = sampled["center"], sampled["views"]
        expected = torch.where(choice[:, None] == 0, center, views[torch.arange(len(choice)), (choice - 1).clamp(min=0)])
        torch.testing.assert_close(buffer, expected)
        reads.append(choice.clone())
        return buffer

    monkeypatch.setattr(ViewSampler, "refresh", recorded)
    monkeypatch.setattr(ViewSampler, "__init__", init)
    result = train_head(HeadOptions(cache=str(path), out=str(tmp_path / "h.pt"), device="cpu", epochs=8),
                        log=lambda line: None)
    fit_rows = len(reads[0])
    counts = torch.stack([torch.bincount(row_choices, minlength=4) for row_choices in torch.stack(reads, 1)])
    assert (counts == 2).all()  # 8 epochs = 2 cycles of (center + 3 views): every row reads every view twice
    assert result.views["rows_read"] == [2 * fit_rows] * 4 and result.views["names"][0] == "center"
    assert not (reads[0] == reads[4]).all()  # each cycle draws its own order
    result = train_head(HeadOptions(cache=str(path), out=str(tmp_path / "h.pt"), device="cpu", epochs=2,
                                    views_policy="center-only"), log=lambda line: None)
    assert result.views["names"] == ["center"] and len(reads) == 8


@pytest.mark.parametrize("extra", [{}, {"sweep": True, "refit": False, "lrs": (0.1, 1.0)}])
def test_tta_evaluation_averages_the_two_predictions(tmp_path, extra):
    path, data = views_cache(tmp_path / "v.h5")
    test_x, test_y, test_views = data["test"]
    opts = HeadOptions(cache=str(path), out=str(tmp_path / "h.pt"), device="cpu", epochs=3, **extra)
    result = train_head(opts, log=lambda line: None)
    head = load_head(tmp_path / "h.pt")[0]
    with torch.no_grad():
        probs = (head(torch.from_numpy(test_x)).softmax(1) + head(torch.from_numpy(test_views[:, 0])).softmax(1)) / 2
    labels = torch.from_numpy(test_y)
    assert result.views["tta"] == "flip"
    assert result.test["top1"] == pytest.approx((probs.argmax(1) == labels).float().mean().item())
    assert result.test["loss"] == pytest.approx(-probs[torch.arange(len(labels)), labels].log().mean().item(), rel=1e-5)
    plain = train_head(replace(opts, tta=False), log=lambda line: None)
    with torch.no_grad():
        logits = load_head(tmp_path / "h.pt")[0](torch.from_numpy(test_x))
    assert plain.views["tta"] == "none"
    assert plain.test["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_knn_flip_averages_the_vote_shares_of_both_views():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(60, 16, generator=g), dim=1)
    labels = torch.randint(0, 3, (60,), generator=g)
    queries, flipped = (F.normalize(torch.randn(9, 16, generator=g), dim=1) for _ in range(2))
    preds = knn_predict(train, labels, queries, [1, 5, 20], 0.07, 3, query_rows=4, train_rows=25, flipped=flipped)
    for k in (1, 5, 20):
        shares = []
        for q in (queries, flipped):  # brute force: every similarity, the k largest, exp(sim / T) per class
            sims = q @ train.T
            top = sims.topk(k, dim=1)
            votes = torch.zeros(len(q), 3).scatter_add_(1, labels[top.indices], torch.exp(top.values / 0.07))
            shares.append(votes / votes.sum(1, keepdim=True))
        torch.testing.assert_close(preds[k], (shares[0] + shares[1]).argmax(1))


def test_predict_tta_averages_image_and_mirror_probabilities():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    images = torch.randn(5, 3, 4, 4)
    predictor = Predictor(Classifier(model, list(CLASSES), Preprocess(4, 4)), "cpu", amp=False, tta=True)
    with torch.no_grad():
        expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
    torch.testing.assert_close(predictor.probabilities(images), expected)


def test_knn_and_train_head_say_which_views_they_used(tmp_path, capsys):
    path, _ = views_cache(tmp_path / "v.h5")
    code, out, err = run(["knn", "--cache", str(path), "--k", "1,5", "--device", "cpu", "--metrics", str(tmp_path / "k.json")], capsys)
    assert code == 0 and "test-time flip" in out and json.loads((tmp_path / "k.json").read_text())["tta"] == "flip", err
    code, out, _ = run(["knn", "--cache", str(path), "--k", "1,5", "--device", "cpu", "--no-tta"], capsys)
    assert code == 0 and "test-time flip" not in out
    code, out, _ = run(["train-head", "--cache", str(path), "--epochs", "4", "--device", "cpu", "--out", str(tmp_path / "h.pt")], capsys)
    assert code == 0 and "views: center 216, flip 216, recipe 216, recipe 216 rows read" in out and "test-time flip: flip" in out


@pytest.mark.parametrize("argv, message", [
    (["cache", "--views", "-1"], "--views must be a whole number >= 0, got -1"),
    (["train-head", "--tta"], "holds no flipped views"),
    (["knn", "--tta", "--k", "1"], "holds no flipped views"),
])
def test_bad_view_options_fail_in_one_line(tmp_path, capsys, argv, message):
    rng = np.random.default_rng(0)
    plain = write_cache(tmp_path / "plain.h5", {"train": separable(60, rng), "test": separable(30, rng)})
    where = ["--data", str(tmp_path), "--out", str(tmp_path / "c.h5")] if argv[0] == "cache" else ["--cache", str(plain)]
    code, _, err = run([*argv, *where, "--device", "cpu"], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_view_plan_lists_each_splits_views():
    plan = ViewPlan(flip=True, views=2, seed=5)
    assert plan.transforms("test") == [{"transform": "flip", "seed": None}]
    assert [v["transform"] for v in plan.transforms("train")] == ["flip", "crop-flip", "crop-flip"]
    assert ViewPlan().by_split(("train", "test")) == {"train": [], "test": []}
