"""What the user reads: one-line summaries and machine-readable metrics files."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from .errors import InputError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write` a temporary file beside `path`, then rename it: a crash never leaves a truncated file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


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


def read_torch_file(path: str | Path, what: str, weights_only: bool = False):
    """torch.load on the CPU, or a one-line InputError naming `what` (e.g. "checkpoint")."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        raise InputError(f"unreadable {what} {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
