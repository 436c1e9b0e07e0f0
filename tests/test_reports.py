"""train-head's --predictions CSV and --plot PNGs: values checked against the saved head, one line without matplotlib."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLASSES, make_folder, run, separable, write_cache

from fastfeat.head import load_features
from fastfeat.model_files import load_head


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory) -> Path:
    """A cache whose rows name their image files, as a cache of an image folder does."""
    rng = np.random.default_rng(3)
    splits = {"train": separable(400, rng), "test": separable(120, rng)}
    files = {name: [f"{name}/{CLASSES[c]}/{i:04d}.jpg" for i, c in enumerate(y)] for name, (_, y) in splits.items()}
    return write_cache(tmp_path_factory.mktemp("reports") / "folder.h5", splits, files=files)


def test_predictions_csv_holds_every_test_row_as_the_saved_head_classifies_it(folder_cache, tmp_path, capsys):
    code, _, err = run(["train-head", "--cache", str(folder_cache), "--out", str(tmp_path / "h.pt"), "--device", "cpu",
                          "--predictions", str(tmp_path / "p.csv")], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    head, classes, _ = load_head(tmp_path / "h.pt")
    _, _, (_, _, test_x, test_y) = load_features(folder_cache, torch.device("cpu"))
    with torch.no_grad():
        confidence, predicted = head(test_x).softmax(1).max(1)
    assert [int(r["row"]) for r in rows] == list(range(len(test_y)))
    assert [r["label"] for r in rows] == [classes[i] for i in test_y.tolist()]
    assert [r["predicted"] for r in rows] == [classes[i] for i in predicted.tolist()]
    assert np.allclose([float(r["probability"]) for r in rows], confidence.numpy(), atol=1e-5)
    assert rows[5]["file"] == f"test/{classes[int(test_y[5])]}/0005.jpg"
    assert rows[5]["file"].split("/")[1] == rows[5]["label"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the plot extra) is not installed")
def test_plot_writes_the_curves_the_confusion_matrix_and_the_sweep_heatmap(folder_cache, tmp_path, capsys):
    from matplotlib.image import imread

    code, _, err = run(["train-head", "--cache", str(folder_cache), "--out", str(tmp_path / "h.pt"), "--device", "cpu",
                        "--sweep", "--lrs", "0.1,1", "--weight-decays", "0.001,0.01", "--plot", str(tmp_path / "plots")],
                       capsys)
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == ["confusion.png", "learning_curves.png", "sweep.png"]  # the refit's epochs make the curves
    for name in written:
        image = imread(tmp_path / "plots" / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0.01  # a real picture, not blank


def test_plot_without_matplotlib_is_one_line_before_any_training(folder_cache, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, _, err = run(["train-head", "--cache", str(folder_cache), "--out", str(tmp_path / "h.pt"),
                        "--plot", str(tmp_path / "plots")], capsys)
    assert code == 2 and len(err) == 1 and "pip install 'fastfeat[plot]'" in err[0]
    assert not (tmp_path / "h.pt").exists() and not (tmp_path / "plots").exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the plot extra) is not installed")
@pytest.mark.slow
def test_finetune_writes_the_last_models_test_predictions_and_its_plots(tmp_path, capsys):
    data = make_folder(tmp_path / "folder", per_class=4)
    code, _, err = run(["finetune", "--data", str(data), "--weights", "none", "--image-size", "32", "--resize", "36",
                        "--loader", "torch", "--device", "cpu", "--epochs", "2", "--batch-size", "4", "--val-fraction", "0",
                        "--checkpoint-dir", str(tmp_path / "ck"), "--predictions", str(tmp_path / "p.csv"),
                        "--plot", str(tmp_path / "plots"), "--metrics", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    metrics = __import__("json").loads((tmp_path / "m.json").read_text())
    assert [r["file"] for r in rows] == sorted(f"test/{c}/{i}.{'png' if i % 2 else 'jpg'}" for c in ("cat", "dog")
                                               for i in range(4))
    hits = sum(r["label"] == r["predicted"] for r in rows)
    assert hits / len(rows) == pytest.approx(metrics["test"]["top1"])  # the CSV is the last model's test pass
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["confusion.png", "learning_curves.png"]
