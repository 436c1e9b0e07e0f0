"""Device and precision choices shared by every command."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .errors import InputError

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_LOADER_WORKERS = 16


def loader_workers() -> int:
    """Decode workers (DataLoader processes, DALI threads): this process's share of the CPU cores it
    may run on, split between the ranks torchrun started on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_LOADER_WORKERS, cores // ranks_here))


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks the current CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise InputError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def amp_dtype(device: torch.device, amp: bool, forced: str | None = None) -> torch.dtype | None:
    """The autocast dtype: bf16 on CPU and bf16-capable GPUs, fp16 on older GPUs; None = fp32."""
    if not amp:
        return None
    if forced is not None:
        if forced not in AMP_DTYPES:
            raise InputError(f"unknown --amp-dtype {forced!r}: choose bfloat16 or float16")
        return AMP_DTYPES[forced]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer around it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_arrays(tensors: Iterable[torch.Tensor], device: torch.device) -> Iterator[np.ndarray]:
    """`tensors` (on `device`) as host arrays. On a GPU each is copied without blocking into pinned
    memory (torch's caching host allocator reuses the buffers) and handed on once the next one is
    queued, so the copy and the caller's work on it overlap the next batch's GPU work."""
    if device.type != "cuda":
        yield from (t.numpy() for t in tensors)
        return
    pending = None
    for tensor in tensors:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        if pending is not None:
            pending[1].synchronize()
            yield pending[0].numpy()
        pending = (host, copied)
    if pending is not None:
        pending[1].synchronize()
        yield pending[0].numpy()
