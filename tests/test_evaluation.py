"""Per-class results: the report against direct counts, and predict --data's metrics and CSV."""
from __future__ import annotations

import csv
import json

import numpy as np
import torch
from helpers import make_cifar, make_folder, run, separable, write_cache

from fastfeat.evaluation import classification_report


def test_report_equals_direct_counts():
    rng = np.random.default_rng(0)
    k, n = 7, 300
    labels = rng.integers(0, k - 1, n)  # the last class has no rows
    scores = rng.normal(0, 1, (n, k)) + 2.0 * np.eye(k)[labels] * (rng.random(n) < 0.5)[:, None]
    report = classification_report(torch.from_numpy(scores), torch.from_numpy(labels))
    confusion = np.zeros((k, k), dtype=int)
    for truth, guess in zip(labels, scores.argmax(1)):
        confusion[truth, guess] += 1
    assert report["confusion"] == confusion.tolist() and sum(map(sum, report["confusion"])) == n
    per_class = [confusion[c, c] / confusion[c].sum() if confusion[c].sum() else None for c in range(k)]
    assert report["per_class"][-1] is None and np.allclose(report["per_class"][:-1], per_class[:-1])
    assert np.isclose(report["mean_per_class"], np.mean(per_class[:-1]))
    assert np.isclose(report["top1"], np.mean(scores.argmax(1) == labels))
    top5 = np.mean([label in np.argsort(-row)[:5] for row, label in zip(scores, labels)])
    assert np.isclose(report["top5"], top5) and report["top5"] >= report["top1"]
    assert "top5" not in classification_report(torch.randn(10, 5), torch.arange(10) % 5)  # five classes: no top-5


def test_predict_data_reports_per_class_results_and_writes_every_prediction(tmp_path, capsys):
    data = make_folder(tmp_path / "f", per_class=6, classes=("cat", "dog", "emu"))
    tiny = ["--image-size", "32", "--resize", "36", "--device", "cpu", "--loader", "torch"]
    cache = tmp_path / "c.h5"
    assert run(["cache", "--data", str(data), "--weights", "none", *tiny, "--out", str(cache), "--no-progress"], capsys)[0] == 0
    assert run(["train-head", "--cache", str(cache), "--device", "cpu", "--epochs", "2", "--val-fraction", "0"], capsys)[0] == 0
    metrics, table = tmp_path / "m.json", tmp_path / "p.csv"
    code, out, err = run(["predict", "--model", str(cache.with_suffix(".head.pt")), "--data", str(data), "--device", "cpu",
                          "--loader", "torch", "--metrics", str(metrics), "--predictions", str(table)], capsys)
    assert code == 0, err
    report = json.loads(metrics.read_text())["test"]
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 18 and sum(map(sum, report["confusion"])) == 18
    assert [r["file"] for r in rows[:2]] == ["test/cat/0.jpg", "test/cat/1.png"] and rows[0]["label"] == "cat"
    assert np.isclose(report["top1"], np.mean([r["label"] == r["predicted"] for r in rows]))
    assert all(0 < float(r["probability"]) <= 1 for r in rows)
    for c, name in enumerate(("cat", "dog", "emu")):
        mine = [r for r in rows if r["label"] == name]
        assert report["confusion"][c] == [sum(r["predicted"] == other for r in mine) for other in ("cat", "dog", "emu")]
    assert f"accuracy {report['top1']:.4f}" in out and "mean per class" in out


def test_info_says_what_each_file_holds(tmp_path, capsys):
    rng = np.random.default_rng(0)
    cache = write_cache(tmp_path / "c.h5", {"train": separable(60, rng), "test": separable(30, rng)})
    partial = write_cache(tmp_path / "p.h5", {"train": separable(8, rng), "test": separable(8, rng)}, finish=False)
    assert run(["train-head", "--cache", str(cache), "--device", "cpu", "--epochs", "1"], capsys)[0] == 0

    def info(path) -> dict:
        code, out, err = run(["info", str(path), "--json"], capsys)
        assert code == 0, err
        return json.loads(out)

    got = info(cache)
    assert (got["kind"], got["complete"], got["classes"]) == ("cache", True, ["a", "b", "c"])
    assert got["splits"]["train"]["rows"] == 60 and got["splits"]["test"]["rows_written"] == 30
    assert got["spec"]["arch"] == "resnet18" and got["spec"]["feature_dim"] == 512
    unfinished = info(partial.with_name("p.h5.partial"))
    assert unfinished["complete"] is False and unfinished["splits"]["train"]["rows_written"] == 8
    head = info(cache.with_suffix(".head.pt"))
    assert (head["kind"], head["classes"], head["spec"]) == ("head", ["a", "b", "c"], got["spec"])
    code, out, _ = run(["info", str(cache)], capsys)
    assert code == 0 and "kind: cache" in out and "complete: True" in out
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for bad, message in [(tmp_path / "none.h5", "does not exist"), (tmp_path / "junk.pt", "unreadable model file")]:
        code, _, err = run(["info", str(bad)], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_info_on_a_finetune_checkpoint(tmp_path, capsys):
    data = make_cifar(tmp_path / "d", n_train=40, n_test=8)
    ckpt = tmp_path / "ck"
    args = ["finetune", "--data", str(data), "--image-size", "32", "--weights", "none", "--device", "cpu",
            "--loader", "torch", "--epochs", "1", "--batch-size", "8", "--no-progress", "--checkpoint-dir", str(ckpt)]
    assert run(args, capsys)[0] == 0
    code, out, err = run(["info", str(ckpt / "last.pt"), "--json"], capsys)
    got = json.loads(out)
    assert got["kind"] == "finetune checkpoint" and got["epochs_done"] == 1 and len(got["valid_acc"]) == 1
    assert got["spec"]["image_size"] == 32 and got["classes"] == ["dark", "bright"]
