"""The GPU check script, dry-run on the CPU at a tiny size, so GPU time is never spent on a broken script."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """With no --data, as on a fresh clone: the script generates its images."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
         "--images", "16", "--image-size", "32", "--resize", "36", "--batch-size", "8", "--stream-rows", "4000",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["data"] == "generated: 30 CIFAR-like images (20 train, 10 test)", report["data"]
    assert set(report["agreement"]) == {"bfloat16", "bfloat16 no-channels-last", "float16", "float16 no-channels-last"}
    assert all(cosine > 0.999 for cosine in report["agreement"].values()), report["agreement"]
    assert set(report["bench"]) == {"cache", "finetune bfloat16", "finetune float16"}
    for name, bench in report["bench"].items():
        assert bench["end_to_end_images_per_second"] > 0 and bench["bottleneck"] in ("loader", "model"), name
    assert report["bench"]["finetune float16"]["settings"]["precision"] == "float16"
    whole, streamed = report["streamed"]["in memory"], report["streamed"]["streamed"]
    # kNN's answer is exact; the head's streamed shuffle differs, on 4,000 hard rows and 2 epochs within a point
    assert streamed["knn_top1"] == whole["knn_top1"] and abs(streamed["head_top1"] - whole["head_top1"]) <= 0.01


@pytest.mark.slow
def test_bench_suite_tiny(tmp_path):
    """One arch, dataset and probe, two trials with the loop running one: the three rows, their cells and
    backbone images, the loop's probe time scaled to both trials, and the loop's full-shot cell equal to the
    suite's."""
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_suite.py"), "--archs", "resnet18", "--datasets", "1",
         "--probes", "head", "--shots", "full", "--trials", "2", "--loop-trials", "1", "--train-images", "40",
         "--test-images", "20", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    suite, loop, per_cell = report["runs"]
    assert report["cells"] == 2 and report["loop_processes_run"] == 2 and report["agree"] == [1, 1]
    assert [r["processes"] for r in report["runs"]] == [1, 3, 2]
    assert [r["images"] for r in report["runs"]] == [60, 60, 120]
    assert loop["wall"] == pytest.approx(loop["backbone"] + loop["probes"])
    assert per_cell["backbone"] == pytest.approx(2 * loop["backbone"]) and per_cell["probes"] == suite["probes"]
    rows = [line for line in report["lines"] if line.startswith("| ") and not line.startswith("| run ")]
    assert [row.split(" | ")[0] for row in rows] == ["| suite (one command)", "| loop of commands",
                                                       "| backbone per cell (extrapolated)"]
    assert all(s in proc.stdout for s in ("| loop of commands |", "1 of 2 trials")), proc.stdout
