"""What the user reads: one-line summaries and machine-readable metrics files."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from .errors import FastfeatError, InputError, refused_pickle

LOG_PROGRESS_SECONDS = 60.0  # how often progress is written when stderr is a log file, not a terminal
LOG_PROGRESS_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f} %), {elapsed} elapsed, {rate_fmt}"


class _Lines(io.TextIOBase):
    """tqdm's output for a log file: each refresh as a line of its own, without carriage returns."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "img") -> tqdm:
    """A live bar on a terminal; in a log file, a plain line at the start, every minute and at the end.
    Use it as a context manager, so a failure closes the bar before the error line is printed."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=_Lines(sys.stderr),
                mininterval=LOG_PROGRESS_SECONDS, bar_format=LOG_PROGRESS_FORMAT)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write` a temporary file beside `path`, then rename it: a crash or a full disk never leaves a truncated
    file, only the previous one. torch's serializer reports a failed write as a RuntimeError."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise FastfeatError(f"cannot write {path}: {reason}") from None


def write_json(path: str | Path, payload: dict) -> None:
    """Write `payload` as JSON, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def epoch_line(epoch: int, train_loss: float, train_acc: float, valid_loss: float, valid_acc: float, seconds: float) -> str:
    """The original recipe's per-epoch line, so runs compare line by line with it."""
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return (
        f"Epoch {epoch}. Train Loss: {train_loss:f}, Train Acc: {train_acc:f}, "
        f"Valid Loss: {valid_loss:f}, Valid Acc: {valid_acc:f}, Time {h:02d}:{m:02d}:{s:02d}"
    )


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save, atomically."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_torch_file(path: str | Path, what: str):
    """torch.load on the CPU with weights_only=True (tensors and plain values only: a crafted file
    cannot run code), or a one-line InputError naming `what` (e.g. "checkpoint")."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():  # a plain (not torch.save) pickle's protocol warning is no second line
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in reason:
            culprit = re.search(r"GLOBAL (\S+)", reason)  # the function or class the file would call
            if culprit:
                raise refused_pickle(what, path, "tensors and plain values", culprit[1]) from None
            # torch's own text suggests an unsafe load instead: show only the cause (e.g. an unsupported opcode)
            cause = re.search(r"WeightsUnpickler error:\s*(.+)", reason)
            reason = cause[1] if cause else "not a file torch.save wrote"
        raise InputError(f"unreadable {what} {path}: {reason.splitlines()[0] if reason else type(exc).__name__}") from None
