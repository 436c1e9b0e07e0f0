"""Nothing lost, nothing crashes: one writer per output, full disks, outputs checked first, damaged caches,
resumes with changed settings, 16-bit PNGs decoded as PIL converts them. Each failure is one stderr line,
no traceback, and the files left behind are checked."""
from __future__ import annotations

import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import LOADERS, hold_lock, make_cifar, make_folder, run, separable, write_cache
from PIL import Image

from fastfeat.cache import CacheOptions, build_cache
from fastfeat.cache_file import partial_path, read_cache
from fastfeat.cli import main
from fastfeat.loaders import center_and_decoded_batches, eval_batches
from fastfeat.outputs import lock_path
from fastfeat.sources import open_dataset
from fastfeat.spec import Preprocess
from fastfeat.synthetic import write_shards

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
    assert main(cache_argv(data, out)) == 0
    return out


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
    assert main(cache_argv(data, out, "--resume")) == 0
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
    assert main(cache_argv(data, out, "--resume")) == 0
    same_cache(out, reference)


@pytest.mark.slow
def test_a_size_limit_reached_mid_run_is_one_line_and_resume_after_it_equals_one_run(data, reference, tmp_path):
    """The limit drops below the file's size once the train rows are written (a disk that fills although the
    space was allocated: copy-on-write file systems, quotas): no segmentation fault, the .partial kept."""
    out = tmp_path / "c.h5"
    limited = ("import resource, sys\nfrom fastfeat.cache_file import CacheWriter\nfrom fastfeat.cli import main\n"
               "real = CacheWriter.write\n"
               "def write(self, split, start, *a):\n"
               " if split == 'test': resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
               " real(self, split, start, *a)\n"
               "CacheWriter.write = write\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", limited, *cache_argv(data, out)], env=ENV, capture_output=True, text=True)
    last_line(proc, "cache", "File too large; free space and rerun with --resume", 1)
    assert len([line for line in proc.stderr.splitlines() if not line.startswith("fastfeat: info: ")]) == 1, proc.stderr
    assert partial_path(out).exists() and not out.exists() and not lock_path(out).exists()
    assert main(cache_argv(data, out, "--resume")) == 0
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
    assert main(argv) == 0
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


@pytest.mark.parametrize("command, option, target, match", [
    ("cache", "--out", "dir", "is a directory"),
    ("cache", "--out", "file/c.h5", "is a file, not a directory"),
    ("finetune", "--checkpoint-dir", "file", "is a file, name a directory"),
    ("finetune", "--metrics", "file/m.json", "is a file, not a directory"),
    ("finetune", "--predictions", "file/p.csv", "is a file, not a directory"),
    ("train-head", "--predictions", "file/p.csv", "is a file, not a directory"),
])
def test_every_command_checks_its_outputs_before_the_work(data, reference, tmp_path, capsys, command, option, target,
                                                          match):
    """One line, exit 2, and nothing written: not the cache, the head or a checkpoint, nor a lock."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    argv = {"cache": cache_argv(data, tmp_path / "c.h5", "--overwrite"),
            "finetune": ["finetune", "--data", str(data), *TINY, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ft")],
            "train-head": ["train-head", "--cache", str(reference), "--device", "cpu", "--epochs", "1",
                           "--out", str(tmp_path / "head.pt")]}[command]
    code, out, err = run([*argv, option, str(tmp_path / target)], capsys)
    assert code == 2 and len(err) == 1 and match in err[0] and out == "", (err, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"] and not any((tmp_path / "dir").iterdir())


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_saved_is_one_line(data, tmp_path):
    """torch's serializer failing under a size limit (it raised `unexpected pos` with a traceback)."""
    ckpt = tmp_path / "ft"
    argv = ["finetune", "--data", str(data), *TINY, "--epochs", "1", "--batch-size", "16", "--checkpoint-dir", str(ckpt)]
    proc = fastfeat(argv, preexec=_file_limit(1_000_000))
    last_line(proc, "finetune", "cannot write", 1)
    assert "File too large" in proc.stderr or "unexpected pos" in proc.stderr, proc.stderr
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.tmp")) and not lock_path(ckpt).exists()


@pytest.mark.slow
def test_a_plot_that_cannot_be_saved_is_one_line_and_leaves_no_temporary(reference, tmp_path):
    """The head (a few KB) fits under the limit, a plot's PNG does not."""
    plots = tmp_path / "plots"
    argv = ["train-head", "--cache", str(reference), "--device", "cpu", "--epochs", "2", "--out", str(tmp_path / "h.pt"),
            "--plot", str(plots)]
    proc = fastfeat(argv, preexec=_file_limit(16_000))
    line = last_line(proc, "train-head", f"cannot write {plots}", 1)
    assert "File too large" in line and (tmp_path / "h.pt").exists(), line
    assert not [p for p in plots.rglob("*") if p.suffix == ".tmp"]


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


# ---- 16-bit PNGs ------------------------------------------------------------------------------------------


def write_png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG from (H, W) grey or (H, W, C) uint16 pixels, written by hand (zlib), not by PIL."""
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def wide_pngs(tmp_path_factory) -> Path:
    """A folder whose classes mix 8-bit PNGs and 16-bit grey, grey-alpha, colour and RGBA ones of one size
    (grey values on both sides of 255, where PIL clamps)."""
    root, rng = tmp_path_factory.mktemp("png16"), np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            level = 20_000 + 30_000 * c
            for channels in (1, 2, 3, 4):
                shape = (20, 24) if channels == 1 else (20, 24, channels)
                pixels = np.clip(rng.normal(level, 15_000, shape), 0, 65535).astype(np.uint16)
                pixels.flat[:4] = [0, 255, 256, 65535]
                write_png16(folder / f"{channels}.png", pixels)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "8.png")
    return root


def pil_rgb(path: str | io.BytesIO) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("loader", LOADERS)
def test_16_bit_pngs_decode_as_pil_converts_them_in_a_batch_with_8_bit_ones(wide_pngs, loader):
    split = open_dataset(str(wide_pngs), splits=("train",)).splits["train"]
    assert Image.open(split.files[0]).mode == "I;16"  # what PIL clamps, not scales
    pre = Preprocess(image_size=16, resize=18)
    (_, decoded), = center_and_decoded_batches(split, loader, pre, len(split), torch.device("cpu"))
    assert len(decoded) == len(split.files) == 10
    for image, path in zip(decoded, split.files):
        assert image.dtype == torch.uint8
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pil_rgb(path), err_msg=path)


def test_predict_takes_16_bit_pngs_as_pil_converts_them(wide_pngs, tmp_path, capsys):
    """A head trained on the folder; predict's probabilities for each 16-bit PNG equal those for the 8-bit
    PNG PIL converts it to, all in one batch with an 8-bit image."""
    cache, head = tmp_path / "c.h5", tmp_path / "head.pt"
    assert run(cache_argv(wide_pngs, cache), capsys)[0] == 0
    assert run(["train-head", "--cache", str(cache), "--device", "cpu", "--epochs", "2", "--out", str(head)], capsys)[0] == 0
    wide = sorted(str(p) for p in (wide_pngs / "test").rglob("*.png"))
    converted = []
    for i, path in enumerate(wide):
        converted.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(pil_rgb(path)).save(converted[-1])
    code, out, err = run(["predict", "--model", str(head), "--device", "cpu", "--no-amp", "--topk", "2", *wide, *converted],
                         capsys)
    assert code == 0, err
    scores = [line.split(": ", 1)[1] for line in out.splitlines()]
    assert len(scores) == 2 * len(wide) and scores[: len(wide)] == scores[len(wide) :], out


@pytest.fixture(scope="module")
def wide_shards(wide_pngs, tmp_path_factory) -> Path:
    """The 16-bit PNG folder's images and a JPEG per class as shards of 4 samples: 16-bit grey, grey-alpha,
    colour and RGBA members beside 8-bit PNG and JPEG ones, in one shard and across shards."""
    folder, rng = tmp_path_factory.mktemp("png16-folder") / "f", np.random.default_rng(1)
    shutil.copytree(wide_pngs, folder)
    for class_folder in folder.glob("*/*"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(class_folder / "9.jpg", quality=90)
    return write_shards(folder, tmp_path_factory.mktemp("png16-shards"), per_shard=4)


def member_pixels(split) -> list[np.ndarray]:
    """PIL's `convert("RGB")` of each row's member, read whole at its offset: the reference."""
    return [pil_rgb(io.BytesIO(split.members.read(row))) for row in range(len(split))]


@pytest.mark.parametrize("loader", LOADERS)
def test_16_bit_png_members_of_shards_decode_as_pil_converts_them(wide_shards, loader):
    """Every member decoded as PIL converts it, in batches that straddle shards and end short; a shuffle's
    and a subset's center crops equal the torch loader's in that order."""
    split = open_dataset(str(wide_shards), splits=("train",)).splits["train"]
    expected = member_pixels(split)
    modes = [Image.open(io.BytesIO(split.members.read(row))).mode for row in range(len(split))]
    assert len(split) == 12 and {"I;16", "RGB", "RGBA"} <= set(modes) and sum(m.endswith(".jpg") for m in split.members.names) == 2
    pre = Preprocess(image_size=16, resize=18)
    decoded = [image for _, images in center_and_decoded_batches(split, loader, pre, 5, torch.device("cpu")) for image in images]
    assert len(decoded) == len(split)
    for image, reference, name in zip(decoded, expected, split.files):
        assert image.dtype == torch.uint8
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), reference, err_msg=name)
    for rows, order in ((split, np.random.default_rng(2).permutation(len(split))), (split.take(np.array([1, 2, 6, 9])), None)):
        got, want = (torch.cat(list(eval_batches(rows, name, pre, 3, torch.device("cpu"), order))) for name in (loader, "torch"))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("loader", LOADERS)
def test_shards_with_16_bit_pngs_cache_the_features_of_their_pil_conversion(wide_shards, loader, tmp_path):
    """The shards' cache (either loader) against the torch loader's cache of a folder of 8-bit PNGs holding
    PIL's conversion of each member, row for row."""
    dataset = open_dataset(str(wide_shards))
    converted = tmp_path / "converted"
    for name, split in dataset.splits.items():
        for row, (pixels, label) in enumerate(zip(member_pixels(split), split.labels.tolist())):
            (converted / name / dataset.classes[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(converted / name / dataset.classes[label] / f"{row:03d}.png")
    opts = dict(weights="none", image_size=32, resize=36, device="cpu", progress=False, amp=False, dtype="float32",
                batch_size=5, compile=False)
    caches = {}
    for name, data, kind in (("shards", wide_shards, loader), ("converted", converted, "torch")):
        build_cache(CacheOptions(data=str(data), out=str(tmp_path / f"{name}.h5"), loader=kind, **opts))
        caches[name] = read_cache(tmp_path / f"{name}.h5")
    for split in ("train", "test"):
        a, b = caches["shards"], caches["converted"]
        np.testing.assert_array_equal(a.labels[split], b.labels[split])
        assert a.features[split].shape == (12, 512) and a.features[split].std() > 0
        torch.testing.assert_close(torch.from_numpy(a.features[split]), torch.from_numpy(b.features[split]))


def test_png_heads_of_tar_members_are_their_first_bytes(wide_shards, tmp_path):
    """`TarMembers.heads` against each member read whole (zeros past a member's end); shards without 16-bit
    members keep DALI's webdataset reader (no kinds), those with them get each one's kind."""
    from fastfeat.dali_loader import PNG_HEAD, WIDE_COLOUR, WIDE_GREY, image_heads, wide_png_kinds

    split = open_dataset(str(wide_shards), splits=("train",)).splits["train"]
    members = split.members.take(np.random.default_rng(3).permutation(len(split)))  # rows out of shard order
    whole = [np.frombuffer(members.read(row)[:PNG_HEAD], dtype=np.uint8) for row in range(len(split))]
    np.testing.assert_array_equal(members.heads(PNG_HEAD), np.stack(whole))
    short = replace(members, size=np.minimum(members.size, 10)).heads(PNG_HEAD)
    assert (short[:, 10:] == 0).all() and (short[:, :10] == np.stack(whole)[:, :10]).all()
    modes = [Image.open(io.BytesIO(split.members.read(row))).mode for row in range(len(split))]
    expected = [WIDE_GREY if m == "I;16" else WIDE_COLOUR if wide else 0
                for m, wide in zip(modes, (split.members.read(r)[24] == 16 for r in range(len(split))))]
    assert wide_png_kinds(image_heads(split)).tolist() == expected
    plain = write_shards(make_folder(tmp_path / "f", per_class=2), tmp_path / "w", per_shard=3)
    assert wide_png_kinds(image_heads(open_dataset(str(plain), splits=("train",)).splits["train"])) is None
