"""`fastfeat bench`: it runs with and without --data, its JSON holds every field, and the bottleneck it
names is the stage that was made slow."""
from __future__ import annotations

import json
import time

import pytest
from helpers import run

from fastfeat import bench
from fastfeat.backbone import FeatureExtractor
from fastfeat.errors import InputError
from fastfeat.loaders import prefetch

TINY = ["--image-size", "32", "--resize", "36", "--images", "20", "--batch-size", "10", "--repeats", "1",
        "--loader", "torch", "--device", "cpu", "--no-amp"]  # bf16 is slow at 32 px on CPUs without AMX
FIELDS = {"loader_images_per_second", "model_images_per_second", "end_to_end_images_per_second", "bottleneck",
          "efficiency", "startup_seconds", "settings", "machine"}


def test_bench_cache_on_generated_images_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = run(["bench", "cache", *TINY, "--vs-original", "--json", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert FIELDS <= set(report), FIELDS - set(report)
    rates = {stage: report[f"{stage}_images_per_second"] for stage in ("loader", "model", "end_to_end", "original")}
    assert all(rate > 0 for rate in rates.values()), rates
    slower = min(rates["loader"], rates["model"])
    assert report["bottleneck"] == ("loader" if rates["loader"] == slower else "model")
    assert report["efficiency"] == pytest.approx(rates["end_to_end"] / slower, rel=1e-2)  # rates are rounded
    assert report["settings"]["data"] == "generated: 30 CIFAR-like images (20 train, 10 test)"
    assert report["settings"]["images"] == 20 and report["settings"]["precision"] == "float32"
    assert {"cpu_model", "cpu_cores", "gpu", "torch", "dali"} <= set(report["machine"])
    assert report["startup_seconds"] == pytest.approx(sum(report["startup"].values()), abs=2e-3)
    assert "bottleneck: " in stdout and "end to end" in stdout and "original recipe" in stdout


def test_bench_finetune_on_a_folder_given_with_data(sample, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = run(["bench", "finetune", *TINY, "--data", str(sample / "folder"), "--dataset", "folder",
                             "--json", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["settings"]["data"] == str(sample / "folder") and report["settings"]["dataset"] == "folder"
    assert report["command"] == "bench finetune" and report["end_to_end_images_per_second"] > 0
    assert "original" not in report["runs"]


def slowed(function, seconds: float):
    """`function` (a generator of batches) sleeping `seconds` before each batch."""
    def slow(*args, **kwargs):
        for batch in function(*args, **kwargs):
            time.sleep(seconds)
            yield batch
    return slow


@pytest.mark.slow
def test_the_bottleneck_is_the_slowed_stage(tmp_path, monkeypatch, capsys):
    """One batch of 10 tiny images: a loader sleeping 1 s a batch is slower than any model here (even on
    a loaded machine); then a model sleeping 1 s a call is slower than the loader."""
    argv = ["bench", "cache", *TINY, "--images", "10", "--json", str(tmp_path / "bench.json")]
    monkeypatch.setattr(bench, "eval_batches", slowed(bench.eval_batches, 1.0))
    assert run(argv, capsys)[0] == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["bottleneck"] == "loader" and report["loader_images_per_second"] < 10, report
    monkeypatch.undo()

    call = FeatureExtractor.__call__
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, images: (time.sleep(1.0), call(self, images))[1])
    assert run(argv, capsys)[0] == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["bottleneck"] == "model" and report["model_images_per_second"] < 10, report


def test_bench_refuses_bad_settings_in_one_line(capsys):
    code, _, err = run(["bench", "cache", "--images", "5"], capsys)
    assert code == 2 and len(err) == 1 and "--images must be a whole number >= 10, got 5" in err[0]


def test_prefetch_keeps_order_raises_in_order_and_stops_early():
    made = []

    def items(fail_at: int | None = None):
        for i in range(10):
            if i == fail_at:
                raise InputError(f"bad item {i}")
            made.append(i)
            yield i

    assert list(prefetch(items(), depth=2)) == list(range(10))
    got = []
    with pytest.raises(InputError, match="bad item 4"):
        for item in prefetch(items(fail_at=4)):
            got.append(item)
    assert got == [0, 1, 2, 3]  # every item made before the failure arrives first
    made.clear()
    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    stream.close()  # the consumer stops: the producer stops within depth + 1 more items
    assert len(made) <= 4
