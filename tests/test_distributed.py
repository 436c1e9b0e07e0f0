"""torchrun on CPU (gloo, 2 processes): one cache equal to a 1-rank run, DDP fine-tuning that resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import TINY, cache_rows, hold_lock, make_folder, torchrun

from fastfeat.cache_file import shard_path
from fastfeat.distributed import World, shard_range
from fastfeat.finetune import epoch_order
from fastfeat.model_files import read_checkpoint
from fastfeat.outputs import lock_path
from fastfeat.runtime import MAX_LOADER_WORKERS, loader_workers



def test_shards_are_disjoint_and_cover_every_row():
    for n in (0, 1, 7, 10):
        parts = [shard_range(n, World(rank, 3)) for rank in range(3)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    orders = [epoch_order(103, 5, 2, 8, World(rank, 2)) for rank in range(2)]
    assert len(orders[0]) == len(orders[1]) == 48 and not set(orders[0]) & set(orders[1])


def test_decode_workers_split_the_cores_between_the_ranks_of_a_node(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers() == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_workers() == MAX_LOADER_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers() == 1


@pytest.mark.slow
def test_two_rank_cache_equals_one_rank_cache_and_resumes_after_a_rank_dies(tmp_path):
    data = make_folder(tmp_path / "folder", per_class=7)
    bad = data / "test" / "dog" / "zz.jpg"  # last row of test: in rank 1's shard
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 20)
    common = ["cache", "--data", str(data), *TINY, "--no-progress", "--no-amp", "--dtype", "float32", "--batch-size", "4"]
    out = tmp_path / "two.h5"

    failed = torchrun(*common, "--out", str(out))
    assert failed.returncode != 0 and "corrupt image" in failed.stderr, failed.stderr[-3000:]
    assert not out.exists()
    leftovers = [p for r in (0, 1) for p in (shard_path(out, r, 2), shard_path(out, r, 2).with_name(shard_path(out, r, 2).name + ".partial"))]
    assert any(p.exists() for p in leftovers)  # resumable state, not a final file

    bad.write_bytes((data / "test" / "dog" / "0.jpg").read_bytes())  # the user fixes the file
    done = torchrun(*common, "--out", str(out), "--resume", "--metrics", str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("cached ") == 1  # only rank 0 reports
    assert 0 < json.loads((tmp_path / "m.json").read_text())["images"] < 28  # only the rows still missing
    assert not [p for p in leftovers if p.exists()]

    single = subprocess.run([sys.executable, "-m", "fastfeat", *common, "--out", str(tmp_path / "one.h5")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    two, one = cache_rows(out), cache_rows(tmp_path / "one.h5")
    for key in one:
        if key.endswith("files"):
            np.testing.assert_array_equal(two[key], one[key], err_msg=key)
        else:
            np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_under_torchrun_rank_0_holds_the_final_files_lock(tmp_path):
    """A 2-rank cache of an output another run holds fails at once on rank 0, naming the holder; the final
    file is never written and the holder's lock stays."""
    data = make_folder(tmp_path / "folder", per_class=2)
    out = tmp_path / "c.h5"
    holder = hold_lock(out)
    try:
        failed = torchrun("cache", "--data", str(data), *TINY, "--no-progress", "--no-amp", "--out", str(out), "--overwrite")
        assert failed.returncode != 0 and f"(pid {holder.pid}, lock {lock_path(out)})" in failed.stderr, failed.stderr[-3000:]
        # one line a rank, no traceback of ours (torchrun's launcher prints its own ChildFailedError)
        assert failed.stderr.count("fastfeat cache: error: ") == 2 and "rank 0's error" in failed.stderr, failed.stderr
        assert "fastfeat/" not in failed.stderr and "Exception ignored" not in failed.stderr, failed.stderr[-3000:]
        assert not out.exists() and lock_path(out).read_text().strip() == str(holder.pid)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5.lock", "folder"]  # no rank wrote a shard
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_rank_finetune_checkpoints_and_resumes_with_any_rank_count(learnable, tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.json"
    common = ["finetune", "--data", str(learnable), *TINY, "--no-progress", "--batch-size", "8",
              "--checkpoint-dir", str(ckpt), "--metrics", str(metrics)]
    first = torchrun(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("Epoch 0.") == 1  # rank 0 prints, once
    state = read_checkpoint(ckpt / "last.pt")
    assert state["epoch"] == 1 and not any(k.startswith("module.") for k in state["model"])
    m = json.loads(metrics.read_text())
    assert m["epochs"][0]["train_images"] == 144 and m["validation"] == "holdout"  # 160 rows less the 10 % holdout
    assert m["test"]["top1"] == m["best_test"]["top1"]  # one epoch: last is best, test summed over both ranks
    assert np.array(m["test"]["confusion"]).sum() == 40

    again = torchrun(*common, "--epochs", "2", "--resume")
    assert again.returncode == 0, again.stderr
    assert "Epoch 1." in again.stdout and "Epoch 0." not in again.stdout
    single = subprocess.run([sys.executable, "-m", "fastfeat", *common, "--epochs", "3", "--resume"],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    history = read_checkpoint(ckpt / "last.pt")["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert not np.allclose(read_checkpoint(ckpt / "last.pt")["model"]["layer1.0.conv1.weight"],
                           state["model"]["layer1.0.conv1.weight"])
