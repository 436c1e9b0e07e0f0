"""Every file fastfeat reads loads without unpickling code: a crafted pickle is refused in one line
and its payload never runs, whichever command and option it is handed to."""
from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CPU_32, Payload, fastfeat_here, make_cifar, refused

from fastfeat.cli import main
from fastfeat.sources import open_dataset

QUIET = [*CPU_32, "--no-progress"]  # --weights given by each call


def evil_torch_file(path: Path, marker: Path) -> Path:
    """A torch.save file shaped like a fastfeat checkpoint whose model entry runs the payload."""
    torch.save({"format": "fastfeat-finetune", "model": Payload(marker)}, path)
    return path


def evil_cifar(root: Path, name: str, marker: Path) -> Path:
    """A CIFAR-10 layout whose `name` file is a protocol-2 pickle (like the official ones) running the payload."""
    make_cifar(root, n_train=10, n_test=4)
    (root / "cifar-10-batches-py" / name).write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}, protocol=2))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_cifar(tmp_path_factory.mktemp("data"), n_train=20, n_test=10)


@pytest.fixture(scope="module")
def head(data, tmp_path_factory) -> Path:
    """A head made by `train-head` on a random-init backbone's cache of `data`."""
    out = tmp_path_factory.mktemp("head")
    assert main(["cache", "--data", str(data), "--weights", "none", "--out", str(out / "c.h5"), *QUIET]) == 0
    assert main(["train-head", "--cache", str(out / "c.h5"), "--epochs", "1", "--device", "cpu",
                 "--out", str(out / "head.pt")]) == 0
    return out / "head.pt"


def test_the_payload_runs_under_an_unrestricted_load(tmp_path):
    """The control: the files below really do run code when unpickled the usual way."""
    marker = tmp_path / "MARKER"
    with zipfile.ZipFile(evil_torch_file(tmp_path / "evil.pt", marker)) as archive:  # what an unrestricted torch.load unpickles
        pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
    assert marker.exists()
    marker.unlink()
    batch = evil_cifar(tmp_path / "cifar", "data_batch_1", marker) / "cifar-10-batches-py" / "data_batch_1"
    with batch.open("rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists()


# command, what the error line calls the file, and its arguments ({evil} is the crafted file)
ENTRY_POINTS = {
    "predict --model": ("predict", "model file", ["--model", "{evil}", "--device", "cpu", "x.png"]),
    "predict --weights": ("predict", "weights file", ["--model", "{head}", "--weights", "{evil}", "--device", "cpu", "x.png"]),
    "finetune --init-head": ("finetune", "head file", ["--data", "{data}", "--weights", "none", "--init-head", "{evil}",
                                                       "--checkpoint-dir", "{dir}", *QUIET]),
    "finetune --resume": ("finetune", "checkpoint", ["--data", "{data}", "--weights", "none", "--resume",
                                                     "--checkpoint-dir", "{dir}", *QUIET]),
    "finetune --weights": ("finetune", "weights file", ["--data", "{data}", "--weights", "{evil}", "--checkpoint-dir", "{dir}", *QUIET]),
    "cache --weights": ("cache", "weights file", ["--data", "{data}", "--weights", "{evil}", "--out", "{dir}/c.h5", *QUIET]),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_crafted_torch_file_is_refused_in_one_line(entry, data, head, tmp_path, capsys):
    command, what, argv = ENTRY_POINTS[entry]
    marker, folder = tmp_path / "MARKER", tmp_path / "out"
    evil = evil_torch_file(tmp_path / "evil.pt", marker)
    if entry == "finetune --resume":  # the crafted file as the run's last.pt
        folder.mkdir()
        evil = shutil.move(evil, folder / "last.pt")
    done = fastfeat_here(capsys, command, *(a.format(evil=evil, data=data, head=head, dir=folder) for a in argv))
    assert done.returncode == 2 and refused(done.stderr, command, what, evil, "tensors and plain values"), done.stderr
    assert not marker.exists()


def test_a_plain_pickle_given_as_a_model_is_unreadable_in_one_line(tmp_path, capsys):
    """Not a torch.save file (protocol 4 frames): the safe loader stops at the first unknown opcode."""
    marker, evil = tmp_path / "MARKER", tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"format": "fastfeat-finetune", "model": Payload(marker)}, protocol=4))
    done = fastfeat_here(capsys, "predict", "--model", evil, "--device", "cpu", "x.png")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"fastfeat predict: error: unreadable model file {evil}: ")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["data_batch_1", "batches.meta"])
def test_a_crafted_cifar_batch_is_refused_in_one_line(name, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    root = evil_cifar(tmp_path / "cifar", name, marker)
    done = fastfeat_here(capsys, "cache", "--data", root, "--weights", "none", "--out", tmp_path / "c.h5", *QUIET)
    path = root / "cifar-10-batches-py" / name
    assert done.returncode == 2 and refused(done.stderr, "cache", "CIFAR-10 file", path, "numpy arrays and plain values"), done.stderr
    assert not marker.exists() and not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_cifar_batches_pickled_with_any_protocol_load(protocol, tmp_path):
    """The restricted unpickler still reads arrays however python pickled them (protocol 2 needs _codecs,
    5 numpy's _frombuffer); the official python-2 batches use protocol 2 (see the real-sample tests)."""
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    images = np.random.default_rng(protocol).integers(0, 256, (2, 3 * 32 * 32), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": images, b"labels": [0, 1], b"filenames": [b"a.png", b"b.png"], b"batch_label": "x"}
        (base / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=protocol))
    dataset = open_dataset(tmp_path, "cifar10")
    assert dataset.classes == ("a", "b")
    np.testing.assert_array_equal(dataset.splits["test"].images, images.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))


def test_what_fastfeat_writes_loads_with_weights_only(data, head, tmp_path):
    """Checkpoints (RNG state included) and heads hold only tensors and plain values, and resume safely."""
    ckpt = tmp_path / "ckpt"
    args = ["finetune", "--data", str(data), "--weights", "none", "--batch-size", "8", "--checkpoint-dir", str(ckpt), *QUIET]
    assert main([*args, "--epochs", "1"]) == 0
    for path in (ckpt / "last.pt", ckpt / "best.pt", head):
        assert isinstance(torch.load(path, weights_only=True), dict)
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == 2
