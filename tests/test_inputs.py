"""Honest subsets and one-line failures: --limit, empty classes, bad numbers and sizes, non-finite
features and diverging runs, CPU-only installs, progress bars around errors, torchrun failures."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import h5py
import numpy as np
import pytest
import torch
import torchvision
from helpers import CPU_AMP, TINY, error_lines, fastfeat_here, make_cifar, make_folder, one_line, run, separable, write_cache

from fastfeat.backbone import build_backbone
from fastfeat.errors import FastfeatError, InputError
from fastfeat.finetune import FinetuneOptions, finetune
from fastfeat.head import HeadOptions, train_head
from fastfeat.sources import balanced_rows, open_dataset



def test_balanced_rows_against_brute_force():
    """Every class gets floor or ceil of its fair share (or all its rows), rows in dataset order, seeded."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        labels = np.sort(rng.integers(0, rng.integers(1, 9), rng.integers(1, 120)))  # sorted by class, like folders
        limit = int(rng.integers(1, len(labels) + 10))
        rows = balanced_rows(labels, limit, seed=3)
        assert len(rows) == min(limit, len(labels)) and (np.diff(rows) > 0).all()
        np.testing.assert_array_equal(rows, balanced_rows(labels, limit, seed=3))
        got, have = np.bincount(labels[rows], minlength=labels.max() + 1), np.bincount(labels)
        short = got < have  # classes not taken whole share the rest evenly, and no class gets more than them + 1
        assert not short.any() or got.max() <= got[short].min() + 1, (got, have)
    labels = np.repeat(np.arange(4), 50)
    assert not np.array_equal(balanced_rows(labels, 20, seed=0), balanced_rows(labels, 20, seed=1))


def test_limit_takes_every_class_of_a_sorted_folder(tmp_path, capsys):
    data = make_folder(tmp_path / "f", per_class=30, classes=("a", "b", "c"))
    split = open_dataset(data, splits=("train",), limit=10).splits["train"]
    assert np.bincount(split.labels).tolist() == [4, 3, 3] or sorted(np.bincount(split.labels)) == [3, 3, 4]
    full = open_dataset(data, splits=("train",)).splits["train"].files
    assert list(split.files) == sorted(split.files, key=full.index)  # dataset order kept
    assert open_dataset(data, splits=("train",), limit=10, seed=1).splits["train"].files != split.files

    out = tmp_path / "c.h5"
    code, _, err = run(["cache", "--data", str(data), *TINY, "--limit", "10", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    with h5py.File(out) as f:
        assert sorted(np.bincount(f["train/labels"][:]).tolist()) == [3, 3, 4]
        assert (f.attrs["limit"], f.attrs["seed"]) == (10, 0)
    code, _, err = run(["train-head", "--cache", str(out), "--device", "cpu", "--epochs", "1"], capsys)
    assert code == 0, err
    one_line(["cache", "--data", str(data), *TINY, "--limit", "2", "--out", str(tmp_path / "d.h5")], capsys,
             "smaller than the 3 classes")


def test_an_empty_class_warns_in_cache_and_is_refused_for_training(tmp_path, capsys):
    data = make_folder(tmp_path / "f", per_class=4, classes=("a", "b", "c"))
    for image in (data / "test" / "b").iterdir():
        image.unlink()
    out = tmp_path / "c.h5"
    code, _, err = run(["cache", "--data", str(data), *TINY, "--out", str(out), "--no-progress"], capsys)
    assert code == 0 and len(err) == 1 and "warning" in err[0] and "test split has no images of class b" in err[0], err
    one_line(["train-head", "--cache", str(out), "--device", "cpu"], capsys, "test split has no rows of class b")
    assert not out.with_suffix(".head.pt").exists()
    one_line(["finetune", "--data", str(data), *TINY, "--checkpoint-dir", str(tmp_path / "ck")], capsys,
             "test split has no images of class b")


@pytest.mark.parametrize("sizes, match", [
    (["--image-size", "0"], ">= 1"),
    (["--image-size", "-3"], ">= 1"),
    (["--resize", "0", "--image-size", "32"], ">= 1"),
    (["--image-size", "64", "--resize", "32"], "--image-size 64 is larger than --resize 32"),
])
@pytest.mark.parametrize("command", ["cache", "finetune"])
def test_impossible_sizes_are_one_line(tmp_path, capsys, sizes, match, command):
    data = make_folder(tmp_path / "f")
    target = ["--out", str(tmp_path / "c.h5")] if command == "cache" else ["--checkpoint-dir", str(tmp_path / "ck")]
    args = [command, "--data", str(data), "--weights", "none", "--device", "cpu", "--loader", "torch", *sizes, *target]
    one_line(args, capsys, match)
    assert not list(tmp_path.glob("c.h5*")) and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(tmp_path, capsys, value):
    data = make_folder(tmp_path / "f")
    one_line(["finetune", "--data", str(data), *TINY, f"--lr={value}"], capsys, "not a finite number")
    one_line(["train-head", "--cache", "x.h5", f"--weight-decay={value}"], capsys, "not a finite number")
    with pytest.raises(InputError, match="--lr must be a finite number > 0"):
        finetune(FinetuneOptions(data=str(data), lr=float(value)))
    with pytest.raises(InputError, match="--label-smoothing must be a finite number >= 0 and < 1"):
        train_head(HeadOptions(cache="x.h5", label_smoothing=float(value)))


def test_non_finite_features_are_refused_naming_split_and_row(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train_x, train_y = separable(100, rng)
    train_x[37, 5] = np.inf  # what an fp16 overflow leaves
    cache = write_cache(tmp_path / "nan.h5", {"train": (train_x, train_y), "test": separable(50, rng)})
    one_line(["train-head", "--cache", str(cache), "--device", "cpu"], capsys,
             "train/features hold nan or inf in 1 row(s), the first is row 37")
    assert not cache.with_suffix(".head.pt").exists()


def test_a_diverging_head_stops_without_saving(tmp_path, capsys):
    rng = np.random.default_rng(0)
    cache = write_cache(tmp_path / "c.h5", {"train": separable(300, rng), "test": separable(50, rng)})
    line = one_line(["train-head", "--cache", str(cache), "--device", "cpu", "--lr", "1e38"], capsys, "diverged", code=1)
    assert "lower --lr" in line and not cache.with_suffix(".head.pt").exists()


def test_a_diverging_finetune_stops_without_a_checkpoint(tmp_path):
    data = make_cifar(tmp_path / "d", n_train=40, n_test=8)
    opts = FinetuneOptions(data=str(data), image_size=32, resize=36, weights="none", device="cpu", loader="torch",
                           epochs=1, batch_size=8, lr=1e30, warmup_epochs=0, checkpoint_dir=str(tmp_path / "ck"),
                           progress=False)
    with pytest.raises(FastfeatError, match="diverged in epoch 0"):
        finetune(opts, log=lambda line: None)
    assert not (tmp_path / "ck" / "last.pt").exists() and not (tmp_path / "ck" / "best.pt").exists()


def test_weights_mismatch_message_names_only_what_differs(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, partial)
    with pytest.raises(InputError) as info:
        build_backbone("resnet18", str(partial))
    message = str(info.value)
    assert "missing keys (e.g. layer4." in message and "unexpected" not in message and "[]" not in message, message


def test_predict_refuses_weights_that_are_not_the_heads(tmp_path, capsys, weights_file):
    data = make_cifar(tmp_path / "d", n_train=40, n_test=8)
    cache = tmp_path / "c.h5"
    assert run(["cache", "--data", str(data), *TINY, "--out", str(cache), "--no-progress"], capsys)[0] == 0
    assert run(["train-head", "--cache", str(cache), "--device", "cpu", "--epochs", "1"], capsys)[0] == 0
    head = str(cache.with_suffix(".head.pt"))
    assert run(["predict", "--model", head, "--data", str(data), "--device", "cpu", "--loader", "torch"], capsys)[0] == 0
    one_line(["predict", "--model", head, "--weights", str(weights_file), "--data", str(data), "--device", "cpu"], capsys,
             "are not the backbone the features came from (none:seed=0)")


def test_finetune_resume_without_a_checkpoint_says_so_and_metrics_describe_the_run(tmp_path, capsys):
    data = make_cifar(tmp_path / "d", n_train=40, n_test=8)
    metrics = tmp_path / "m.json"
    code, out, err = run(["finetune", "--data", str(data), *TINY, "--epochs", "1", "--batch-size", "8", "--no-progress",
                          "--checkpoint-dir", str(tmp_path / "ck"), "--resume", "--metrics", str(metrics)], capsys)
    assert code == 0, err
    assert f"no checkpoint at {tmp_path / 'ck' / 'last.pt'} to resume: starting a new run" in out
    m = json.loads(metrics.read_text())
    assert (m["device"], m["precision"], m["loader"], m["ranks"]) == ("cpu", CPU_AMP.name, "torch", 1)
    assert m["precision_reason"] == CPU_AMP.reason


BLOCK_NVIDIA = "import sys; sys.modules['nvidia'] = None; from fastfeat.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
def test_without_any_nvidia_package_cache_falls_back_to_torch(tmp_path):
    """CPU-only torch wheels and macOS have no `nvidia` package at all: auto must pick torch, not crash."""
    data = make_folder(tmp_path / "f")
    args = ["cache", "--data", str(data), "--image-size", "32", "--resize", "36", "--device", "cpu", "--weights", "none",
            "--no-progress"]
    ok = subprocess.run([sys.executable, "-c", BLOCK_NVIDIA, *args, "--out", str(tmp_path / "a.h5")],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "loader=torch" in ok.stdout, ok.stderr
    refused = subprocess.run([sys.executable, "-c", BLOCK_NVIDIA, *args, "--loader", "dali", "--out", str(tmp_path / "b.h5")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and error_lines(refused.stderr) == [
        "fastfeat cache: error: --loader dali: nvidia-dali is not installed (pip install 'fastfeat[dali]', or --loader torch)"]


def run_in_terminal(argv: list[str]) -> str:
    """Run fastfeat with stdout and stderr on a pseudo-terminal (progress bars live), return what it showed."""
    pid, fd = pty.fork()
    if pid == 0:
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
        os.execv(sys.executable, [sys.executable, "-m", "fastfeat", *argv])
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_an_error_under_a_progress_bar_is_its_own_last_line(tmp_path):
    data = make_folder(tmp_path / "f", per_class=12)
    bad = data / "train" / "dog" / "zz.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 20)
    shown = run_in_terminal(["cache", "--data", str(data), *TINY, "--batch-size", "4", "--out", str(tmp_path / "c.h5")])
    assert "\r" in shown and "cache train" in shown  # a live bar was drawn
    last = shown.replace("\r\n", "\n").rstrip("\n").split("\n")[-1]
    assert last == f"fastfeat cache: error: corrupt image: {bad}", repr(shown[-300:])


def test_progress_in_a_log_file_is_a_few_plain_lines(tmp_path, capsys):
    data = make_folder(tmp_path / "f", per_class=12)
    proc = fastfeat_here(capsys, "cache", "--data", data, *TINY, "--batch-size", "2", "--out", tmp_path / "c.h5")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) <= 6 and lines[-1].startswith("cache test: 24/24 img (100 %)"), lines


@pytest.mark.slow
def test_a_failing_rank_stops_every_finetune_rank_with_one_line_each(tmp_path):
    data = make_folder(tmp_path / "f", per_class=12)
    bad = data / "train" / "dog" / "zz.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 20)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastfeat",
         "finetune", "--data", str(data), *TINY, "--batch-size", "4", "--epochs", "1", "--no-progress",
         "--checkpoint-dir", str(tmp_path / "ck")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ours = [line for line in proc.stderr.splitlines() if line.startswith("fastfeat finetune:")]
    assert proc.returncode != 0 and len(ours) == 2, proc.stderr[-3000:]
    assert f"fastfeat finetune: error: corrupt image: {bad}" in ours
    assert any("another rank failed" in line for line in ours), ours
    assert "[rank" not in proc.stderr  # no rank printed a traceback
    assert not (tmp_path / "ck" / "last.pt").exists()
