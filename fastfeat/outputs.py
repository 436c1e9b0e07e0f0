"""Where results go: every output path checked before the work, one writer per output (an advisory lock).

A run that computes for an hour must not then find it cannot save, and two runs writing the same cache,
head or checkpoint directory must not interleave: the second fails at once, naming the first's PID.
The lock is `fcntl.flock` on `<out>.lock` beside the output, so the kernel releases it when its holder
dies (kill -9 included) and the next run simply takes it over; the file records the holder's PID.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import InputError


def check_output(path: str | Path | None, flag: str, directory: bool = False) -> None:
    """Refuse in one line an output `path` (a file, or a directory with `directory`) that could not be
    written: an ancestor that is a file, a directory where a file goes (or the reverse), no write permission."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir() and not directory:
        raise InputError(f"cannot write {flag} {path}: it is a directory, name a file")
    if path.exists() and directory and not path.is_dir():
        raise InputError(f"cannot write {flag} {path}: it is a file, name a directory")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot write {flag} {path}: {parent} is a file, not a directory")
    target = path if path.exists() and directory else parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {flag} {path}: {target} is not writable")


def check_reports(predictions: str | None, plot: str | None) -> None:
    """The `--predictions` file and the `--plot` directory of a training run."""
    check_output(predictions, "--predictions")
    check_output(plot, "--plot", directory=True)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


class OutputLock:
    """Held while one run writes `path`; `with OutputLock(path): ...`. A second holder fails in one line."""

    def __init__(self, path: str | Path):
        self.out, self.path, self.file = Path(path), lock_path(Path(path)), None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self.file is None:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise InputError(f"{self.out} is being written by another fastfeat run "
                                 f"(pid {holder}, lock {self.path}): wait for it or choose another output") from None
            if _same_file(handle, self.path):  # not unlinked by a holder releasing it meanwhile
                self.file = handle
            else:
                handle.close()
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        """Remove the lock file while still holding it, then release: a waiting run retries on the new one."""
        self.path.unlink(missing_ok=True)
        self.file.close()
        self.file = None


def _same_file(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False
