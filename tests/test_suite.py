"""fastfeat suite: the rows of a small suite, each equal to its probe run alone; resumed after a kill without
recomputing a finished cell; a failing cell recorded while the others run; bad configurations refused."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import TINY, make_cifar, make_folder, one_line, run

from fastfeat.cache_file import CacheWriter, read_cache
from fastfeat.head import train_head
from fastfeat.knn import knn_evaluate
from fastfeat.settings import SuiteOptions
from fastfeat.suite import Cell, neighbours, run_suite
from fastfeat.suite_config import resolve

FAST = ["--trials", "2", "--shots", "full,1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("suite-data")
    return {"bright": make_cifar(root / "bright", n_train=40, n_test=20),
            "shapes": make_folder(root / "shapes", per_class=6)}


def config_file(tmp: Path) -> Path:
    path = tmp / "suite.toml"
    path.write_text('[cache]\nbatch_size = 8\n[probes.head]\nepochs = 3\n[probes.sweep]\nepochs = 3\nlrs = [0.1, 0.5]\n'
                    'weight_decays = [0.01]\n[probes.knn]\nk = [1, 3]\n')
    return path


def suite_args(data: dict[str, Path], out: Path, config: Path) -> list[str]:
    datasets = ",".join(f"{name}={path}" for name, path in data.items())
    return ["suite", "--archs", "resnet18,mobilenet_v3_small", "--datasets", datasets, "--out", str(out),
            "--config", str(config), "--no-progress", *FAST, *TINY]


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def comparable(table: list[dict]) -> dict[tuple, dict]:
    """Every row by cell, less what a rerun may change: the seconds, and what a resumed cache ran now."""
    changing = {"seconds"}
    return {(r["arch"], r["dataset"], r["probe"], r["shots"], r["trial"]):
            {k: v for k, v in r.items() if k not in changing | ({"backbone_images", "chosen"} if r["probe"] == "cache"
                                                                 else set())} for r in table}


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("suite")
    out = tmp / "out"
    opts = SuiteOptions(archs=("resnet18", "mobilenet_v3_small"),
                        datasets=tuple(f"{n}={p}" for n, p in data.items()), out=str(out), config=str(config_file(tmp)),
                        trials=2, shots=("full", "1"), weights="none", image_size=32, resize=36, device="cpu",
                        loader="torch", progress=False)
    result = run_suite(opts, log=lambda line: None)
    assert not result.failed and result.ran == result.cells == 2 * 2 * (1 + 2 * 2 * 3)
    return out


@pytest.mark.slow
def test_rows_equal_each_probe_run_alone(finished):
    table = rows(finished)
    assert len(table) == 52 and {r["status"] for r in table} == {"ok"}
    assert sorted({r["probe"] for r in table}) == ["cache", "head", "knn", "sweep"]
    config = resolve(SuiteOptions(config=str(finished / "suite.toml"), progress=False))
    for row in (r for r in table if r["probe"] != "cache"):
        cache = finished / row["cache"]
        seed = int(row["seed"])
        assert seed == int(row["trial"])
        if row["probe"] == "knn":
            shots = None if row["shots"] == "full" else int(row["shots"])
            cell = Cell(row["arch"], config.datasets[0], "knn", shots, seed)
            alone = knn_evaluate(config.knn_options(cache, seed, neighbours(config, cache, cell)), log=lambda line: None)
            report = alone.reports["test"]
        else:
            opts = config.head_options(row["probe"], cache, seed, finished.parent / "alone.head.pt")
            report = train_head(opts, log=lambda line: None).test
        assert float(row["top1"]) == report["top1"], row
        assert float(row["mean_per_class"]) == report["mean_per_class"], row
        assert (row["top5"] == "") == ("top5" not in report)


@pytest.mark.slow
def test_shots_are_class_balanced_and_validate_off_train(finished):
    full = read_cache(finished / "caches" / "shapes-resnet18.h5", ("train", "test"))
    for trial in (0, 1):
        shots = read_cache(finished / "caches" / "shots" / f"shapes-resnet18-1shot-seed{trial}.h5", ("train", "val", "test"))
        assert sorted(shots.labels["train"].tolist()) == [0, 1] and sorted(shots.labels["val"].tolist()) == [0, 1]
        assert not set(shots.files["train"]) & set(shots.files["val"])
        assert set(shots.files["train"]) | set(shots.files["val"]) <= set(full.files["train"])
        assert shots.files["test"] == full.files["test"]
    table = rows(finished)
    assert {r["validation"] for r in table if r["shots"] == "1"} == {"1 per class of the train rows outside the 1 shots"}
    summary = (finished / "summary.md").read_text()
    assert "| resnet18 |" in summary and "mean rank" in summary and "**" in summary
    assert (finished / "summary.png").stat().st_size and (finished / "shots.png").stat().st_size


@pytest.mark.slow
def test_killed_and_rerun_recomputes_nothing_finished(data, finished, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = suite_args(data, out, config_file(tmp_path))
    real_write = CacheWriter.write

    def killed(self, split, start, *rest):  # Ctrl-C inside the second arch's first cache, rows already written
        if "mobilenet" in self.out.name and split == "train" and start > 0:
            raise KeyboardInterrupt
        real_write(self, split, start, *rest)

    monkeypatch.setattr(CacheWriter, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        run_suite(from_args_of(args), log=lambda line: None)
    monkeypatch.setattr(CacheWriter, "write", real_write)
    before = rows(out)
    assert len(before) == 26 and (out / "caches" / "bright-mobilenet_v3_small.h5.partial").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".h5", ".pt")}
    code, printed, _ = run(args, capsys)
    assert code == 0 and "26 of 52 cells finished" in printed
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    after = rows(out)
    assert len(after) == 52 and after[:26] == before
    resumed = next(r for r in after if r["arch"] == "mobilenet_v3_small" and r["probe"] == "cache")
    assert resumed["chosen"] == "continued a partial cache" and 0 < int(resumed["backbone_images"]) < 60
    assert comparable(after) == comparable(rows(finished))


def from_args_of(argv: list[str]) -> SuiteOptions:
    from fastfeat.cli import build_parser
    from fastfeat.options import from_args

    return from_args(SuiteOptions, build_parser().parse_args(argv))


def test_a_failing_cell_is_recorded_and_the_others_run(data, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, err = run(["suite", "--archs", "resnet18", "--datasets", f"shapes={data['shapes']},gone={tmp_path / 'no'}",
                              "--out", str(out), "--probes", "knn", "--no-progress", *TINY], capsys)
    failures = [line for line in err if not line.startswith("fastfeat: info: ")]
    assert code == 1 and len(failures) == 1 and "2 of 4 cells failed" in failures[0]
    table = {r["dataset"] + " " + r["probe"]: r for r in rows(out)}
    assert table["shapes knn"]["status"] == "ok" and float(table["shapes knn"]["top1"]) >= 0
    assert table["gone cache"]["status"] == "failed" and "does not exist" in table["gone cache"]["reason"]
    assert table["gone knn"]["reason"].startswith("no cache: ")


@pytest.mark.parametrize("toml, match", [
    ("archs = ['resnet18']\ndatasets = ['cifar10']\ncolour = 1\n", "unknown key 'colour'"),
    ("archs = ['resnet9000']\ndatasets = ['cifar10']\n", "unknown --arch 'resnet9000'"),
    ("archs = ['resnet18']\ndatasets = ['cifar10']\nshots = [0]\n", "--shots must be full or a whole number >= 1"),
    ("archs = ['resnet18']\ndatasets = ['cifar10']\n[probes.sweep]\nseed = 3\n", "[probes.sweep] seed is set by the suite"),
    ("archs = ['resnet18']\ndatasets = ['cifar10']\n[probes.knn]\nval_fraction = 0\n", "never chooses on test"),
])
def test_bad_configs_are_one_line_before_any_work(tmp_path, capsys, toml, match):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    one_line(["suite", "--config", str(config), "--out", str(tmp_path / "out")], capsys, match)
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, _ = run(["suite", "--archs", "resnet18", "--datasets", f"shapes={data['shapes']}", "--out", str(out),
                            "--dry-run", *FAST, *TINY], capsys)
    assert code == 0 and "13 cells (1 caches, 12 probe cells)" in printed
    assert "compute: 24 backbone images" in printed and not out.exists()


@pytest.mark.slow
def test_finetune_is_opt_in_and_runs_at_full_shots_only(data, tmp_path, capsys):
    config = tmp_path / "ft.toml"
    config.write_text("[probes.knn]\nk = [1]\n[probes.finetune]\nepochs = 1\nbatch_size = 8\nrecompute_bn = 8\n")
    out = tmp_path / "out"
    code, _, _ = run(["suite", "--archs", "resnet18", "--datasets", f"shapes={data['shapes']}", "--out", str(out),
                      "--config", str(config), "--shots", "full,1", "--no-progress", *TINY], capsys)
    table = rows(out)
    assert code == 0 and [(r["probe"], r["shots"]) for r in table] == [
        ("cache", "full"), ("knn", "full"), ("finetune", "full"), ("knn", "1")]
    tuned = table[2]
    assert tuned["status"] == "ok" and int(tuned["backbone_images"]) > 0 and tuned["cache"] == ""
    assert (out / "finetune" / "shapes-resnet18-finetune-full-trial0" / "last.pt").exists()
