"""Nothing lost, nothing crashes: one writer per output, full disks, outputs checked first, damaged caches,
resumes with changed settings (issue 21). Each failure is one stderr line, no traceback, and the files left
behind are checked."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import make_cifar, run, separable, write_cache

from fastfeat.cache_file import partial_path
from fastfeat.outputs import lock_path

TINY = ["--image-size", "32", "--resize", "36", "--weights", "none", "--device", "cpu", "--loader", "torch",
        "--no-amp", "--no-progress"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def cache_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["cache", "--data", str(data), *TINY, "--batch-size", "16", "--out", str(out), *extra]


def fastfeat(argv: list[str], preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastfeat", *argv], env=ENV, capture_output=True, text=True,
                          preexec_fn=preexec, timeout=300)


def last_line(proc: subprocess.CompletedProcess, command: str, match: str, code: int) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith(f"fastfeat {command}: ") and match in lines[-1], lines
    return lines[-1]


def same_cache(a: Path, b: Path) -> None:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert fa.attrs["complete"] and fb.attrs["complete"]
        for split in fb:
            np.testing.assert_array_equal(fa[split]["features"][:], fb[split]["features"][:])
            np.testing.assert_array_equal(fa[split]["labels"][:], fb[split]["labels"][:])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("cifar"), n_train=40, n_test=20)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    proc = fastfeat(cache_argv(data, out))
    assert proc.returncode == 0, proc.stderr
    return out


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding `path`'s lock until killed."""
    code = f"from fastfeat.outputs import OutputLock\nwith OutputLock({str(path)!r}):\n print('held', flush=True)\n" \
           " import time; time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_fails_at_once_naming_the_holder(data, tmp_path, capsys):
    out = tmp_path / "c.h5"
    holder = hold_lock(out)
    try:
        for argv in (cache_argv(data, out, "--overwrite"), cache_argv(data, out)):
            code, _, err = run(argv, capsys)
            assert code == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0] and "--overwrite" not in err[0], err
        assert not out.exists() and not partial_path(out).exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_concurrent_cache_writers_one_wins_and_the_cache_is_whole(data, reference, tmp_path):
    """The first waits before its first rows until the second has run (and failed) while it held the lock."""
    out, go = tmp_path / "c.h5", tmp_path / "go"
    slow = ("import pathlib, sys, time\nfrom fastfeat.cache_file import CacheWriter\nfrom fastfeat.cli import main\n"
            f"real, go = CacheWriter.write, pathlib.Path({str(go)!r})\n"
            "def write(self, *a, **k):\n while not go.exists(): time.sleep(0.05)\n real(self, *a, **k)\n"
            "CacheWriter.write = write\nsys.exit(main(sys.argv[1:]))")
    first = subprocess.Popen([sys.executable, "-c", slow, *cache_argv(data, out, "--overwrite")], env=ENV,
                             stderr=subprocess.PIPE, text=True)
    while not partial_path(out).exists():
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.05)
    second = fastfeat(cache_argv(data, out, "--overwrite"))
    go.touch()
    assert first.wait(timeout=300) == 0, first.stderr.read()
    last_line(second, "cache", f"pid {first.pid}", 2)
    same_cache(out, reference)
    assert not lock_path(out).exists() and not partial_path(out).exists()


@pytest.mark.slow
def test_kill_9_while_holding_the_lock_the_next_run_takes_it_and_resumes(data, reference, tmp_path):
    out = tmp_path / "c.h5"
    killed = ("import os, signal, sys\nfrom fastfeat.cache_file import CacheWriter\nfrom fastfeat.cli import main\n"
              "real = CacheWriter.write\n"
              "def write(self, split, start, *a):\n if split == 'test': os.kill(os.getpid(), signal.SIGKILL)\n"
              " real(self, split, start, *a)\n"
              "CacheWriter.write = write\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", killed, *cache_argv(data, out)], env=ENV, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert lock_path(out).exists() and partial_path(out).exists() and not out.exists()
    resumed = fastfeat(cache_argv(data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    same_cache(out, reference)


def _file_limit(limit: int):
    def preexec():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_resume_after_it_equals_one_run(data, reference, tmp_path):
    """The cache's space is taken when it is created: a size limit fails then, before any work, in one line
    (no segmentation fault, no HDF5 traceback), and nothing is left; without the limit --resume makes the cache."""
    out = tmp_path / "c.h5"
    proc = fastfeat(cache_argv(data, out), preexec=_file_limit(20_000))
    last_line(proc, "cache", "File too large", 1)
    assert not out.exists() and not partial_path(out).exists() and not lock_path(out).exists()
    resumed = fastfeat(cache_argv(data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    same_cache(out, reference)


def test_a_write_failing_mid_run_leaves_a_resumable_partial(data, reference, tmp_path, monkeypatch, capsys):
    """A failure after rows were written keeps them: the .partial stays, and --resume finishes it."""
    from fastfeat.cache_file import CacheWriter

    out, real = tmp_path / "c.h5", CacheWriter.write

    def failing_write(self, split, start, *args):
        if split == "test":
            with self._io():
                raise OSError(28, "No space left on device")
        real(self, split, start, *args)

    monkeypatch.setattr(CacheWriter, "write", failing_write)
    code, _, err = run(cache_argv(data, out), capsys)
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0], err
    assert partial_path(out).exists() and not out.exists()
    monkeypatch.setattr(CacheWriter, "write", real)
    code, _, err = run(cache_argv(data, out, "--resume"), capsys)
    assert code == 0, err
    same_cache(out, reference)


@pytest.mark.slow
def test_a_head_that_cannot_be_saved_keeps_the_previous_one(reference, tmp_path):
    head = tmp_path / "head.pt"
    argv = ["train-head", "--cache", str(reference), "--device", "cpu", "--epochs", "1", "--out", str(head)]
    assert fastfeat(argv).returncode == 0
    before = head.read_bytes()
    proc = fastfeat(argv, preexec=_file_limit(len(before) // 2))
    last_line(proc, "train-head", f"cannot write {head}", 1)
    assert head.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["head.pt"]


@pytest.mark.parametrize("option, target, match", [
    ("--out", "dir", "is a directory"),
    ("--metrics", "dir", "is a directory"),
    ("--metrics", "file/m.json", "is a file, not a directory"),
    ("--predictions", "dir", "is a directory"),
])
def test_outputs_are_checked_before_the_work(reference, tmp_path, capsys, option, target, match):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    argv = ["train-head", "--cache", str(reference), "--device", "cpu", "--epochs", "1", option, str(tmp_path / target)]
    if option != "--out":
        argv += ["--out", str(tmp_path / "head.pt")]
    code, out, err = run(argv, capsys)
    assert code == 2 and len(err) == 1 and match in err[0] and out == "", (err, out)
    assert not (tmp_path / "head.pt").exists()


def _cache(tmp_path: Path, **change) -> Path:
    rng = np.random.default_rng(0)
    out = write_cache(tmp_path / "c.h5", {"train": separable(40, rng), "test": separable(20, rng)})
    with h5py.File(out, "r+") as f:
        for name, value in change.items():
            if name == "classes":
                f.attrs["classes"] = value
            else:
                del f[name]
                f[name] = value
    return out


@pytest.mark.parametrize("change, match", [
    ({"train/labels": np.full(40, 99)}, "outside 0.."),
    ({"train/labels": np.full(40, -1)}, "outside 0.."),
    ({"train/labels": np.zeros(40, np.float32)}, "1-d integers"),
    ({"train/labels": np.zeros((40, 2), np.int64)}, "1-d integers"),
    ({"classes": "not json ["}, "not a JSON list"),
])
def test_bad_cache_labels_and_attributes_are_one_line(tmp_path, capsys, change, match):
    cache = _cache(tmp_path, **change)
    for argv in (["train-head", "--cache", str(cache), "--device", "cpu", "--epochs", "1"],
                 ["knn", "--cache", str(cache), "--device", "cpu"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and len(err) == 1 and match in err[0] and str(cache) in err[0], err


def test_corrupt_cache_bytes_are_one_line_suggesting_to_recreate(tmp_path, capsys):
    cache = _cache(tmp_path)
    raw = bytearray(cache.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = os.urandom(4096)
    cache.write_bytes(bytes(raw))
    for argv in (["train-head", "--cache", str(cache), "--device", "cpu", "--epochs", "1"],
                 ["knn", "--cache", str(cache), "--device", "cpu"], ["info", str(cache)]):
        code, _, err = run(argv, capsys)
        assert code in (0, 2) and len(err) <= 1, err
        if code:
            assert str(cache) in err[0], err


def test_finetune_resume_refuses_changed_settings(data, tmp_path, capsys):
    ckpt = tmp_path / "ft"
    argv = ["finetune", "--data", str(data), *TINY, "--epochs", "1", "--batch-size", "16", "--checkpoint-dir", str(ckpt),
            "--val-fraction", "0"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    code, _, err = run([*argv[:-4], "--batch-size", "8", "--lr", "0.5", *argv[-4:], "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "--batch-size (16, now 8)" in err[0] and "--lr" in err[0], err


def test_a_plain_sigterm_does_not_mention_torchrun(monkeypatch):
    from fastfeat.cli import Terminated, _failure_line

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    line, code = _failure_line("cache", Terminated())
    assert code == 143 and "torchrun" not in line and "--resume" in line
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "under torchrun" in _failure_line("cache", Terminated())[0]
