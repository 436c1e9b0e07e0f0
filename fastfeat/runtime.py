"""Device and precision choices shared by every command."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .settings import AMP_DTYPE_NAMES

AMP_DTYPES = {name: getattr(torch, name) for name in AMP_DTYPE_NAMES}
MAX_LOADER_WORKERS = 16


def loader_workers() -> int:
    """Decode workers (DataLoader processes, DALI threads): this process's share of the CPU cores it
    may run on, split between the ranks torchrun started on this node."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_LOADER_WORKERS, usable_cores() // ranks_here))


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def core_to_spare(device: torch.device) -> bool:
    """Whether a helper thread's CPU work (reading the next block) runs beside the math rather than taking
    cores from it: on a GPU, or where torch's threads leave a core free. On 2 cores that torch's two threads
    use, a read-ahead thread made streamed epochs slower than reading in turn (docs/results.md)."""
    return device.type == "cuda" or torch.get_num_threads() < usable_cores()


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


def image_device(name: str = "auto") -> torch.device:
    """The device of a job that runs batches of images through a backbone (cache, finetune, predict,
    bench); on a CPU the process also keeps freed memory for its next batch (`keep_freed_memory`). Heads
    and kNN only resolve theirs: kept memory would raise their streamed peak RSS (docs/precision.md)."""
    device = resolve_device(name)
    if device.type == "cpu":
        keep_freed_memory()
    return device


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_KEEP_FREED = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


@functools.cache
def keep_freed_memory() -> str:
    """Make glibc keep freed memory for the next batch, once per process, and say what was done.

    By default glibc gives every tensor over 32 MB (a batch of 224-px images) a fresh mmap and unmaps it
    when freed, so each batch pays page faults on memory it used a moment ago; the prefetch thread's own
    arena cannot hold such blocks at all. One arena that never trims or mmaps reuses them (a run's peak
    RSS is then kept until it exits). A user's own MALLOC_* settings or preloaded allocator win."""
    if not sys.platform.startswith("linux"):
        return "system default (not Linux)"
    if any(key.startswith("MALLOC_") for key in os.environ) or "LD_PRELOAD" in os.environ:
        return "as set by the environment"
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return "system default (not glibc)"
    if not all(libc.mallopt(param, value) == 1 for param, value in _KEEP_FREED):
        return "system default (mallopt refused)"
    return "glibc: one arena, freed memory kept"


@dataclass(frozen=True)
class Precision:
    """What the model runs in (`dtype` None = fp32), why, and whether this device runs it natively;
    `notice`: the one line to show when the choice is not what was asked for or is slow here."""

    dtype: torch.dtype | None
    reason: str
    native: bool = True
    notice: str | None = None

    @property
    def name(self) -> str:
        return precision_name(self.dtype)


# Capability checks, one small function each, so tests can patch them.
def cuda_bf16_supported() -> bool:
    return torch.cuda.is_bf16_supported()


def cpu_bf16_native() -> bool:
    """This CPU has bf16 instructions (x86: avx512_bf16 or AMX; arm: the BF16 extension); elsewhere bf16
    autocast is emulated. oneDNN's own check is not enough on x86: it accepts any AVX-512 core, where it
    converts to fp32 and runs slower than fp32 does."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # on arm, oneDNN's check is the BF16 extension itself
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_fp16_native() -> bool:
    """oneDNN has native fp16 kernels here (avx512_fp16 or AMX-FP16)."""
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def cpu_fp16_faster() -> bool:
    """Native fp16 kernels are not always faster than fp32: time a small convolution both ways, once."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    images = torch.randn(16, 64, 28, 28).contiguous(memory_format=torch.channels_last)

    def seconds(dtype: torch.dtype | None) -> float:
        with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
            conv(images)  # oneDNN builds its primitive on the first call
            start = time.perf_counter()
            for _ in range(3):
                conv(images)
        return time.perf_counter() - start

    return seconds(torch.float16) < seconds(None)


def precision(device: torch.device, amp: bool, forced: str | None = None) -> Precision:
    """The one precision policy: with `amp`, the fastest mixed precision this device runs natively
    (fp32 where there is none); `forced` (--amp-dtype) is obeyed even where it is emulated."""
    if not amp:
        return Precision(None, "--no-amp")
    if forced is not None:
        return _forced(device, forced)
    if device.type == "cuda":
        if cuda_bf16_supported():
            return Precision(torch.bfloat16, "CUDA GPU with bf16")
        return Precision(torch.float16, "CUDA GPU without bf16: fp16 with the gradient scaler")
    if cpu_bf16_native():
        return Precision(torch.bfloat16, f"CPU with native bf16 kernels ({cpu_capability()})")
    if cpu_fp16_native() and cpu_fp16_faster():
        return Precision(torch.float16, f"CPU with native fp16 kernels, faster than fp32 ({cpu_capability()})")
    reason = f"CPU without native bf16 or fp16 kernels ({cpu_capability()})"
    return Precision(None, reason, notice=f"info: --amp runs in float32 here: {reason}, where mixed precision is emulated")


def _forced(device: torch.device, forced: str) -> Precision:
    if forced not in AMP_DTYPES:
        raise InputError(f"unknown --amp-dtype {forced!r}: choose {' or '.join(AMP_DTYPES)}")
    dtype = AMP_DTYPES[forced]
    if device.type == "cuda":
        native = dtype == torch.float16 or cuda_bf16_supported()
    else:
        native = cpu_bf16_native() if dtype == torch.bfloat16 else cpu_fp16_native()
    notice = None if native else (f"info: --amp-dtype {forced} is emulated on this {device.type} "
                                  f"({cpu_capability() if device.type == 'cpu' else 'GPU'}): slow here")
    return Precision(dtype, f"--amp-dtype {forced}" + ("" if native else " (emulated)"), native, notice)


_NOTICES: set[str] = set()


def choose_precision(device: torch.device, amp: bool, forced: str | None = None) -> Precision:
    """`precision(...)`, with its notice printed once per process (not once per batch or per model)."""
    chosen = precision(device, amp, forced)
    if chosen.notice and chosen.notice not in _NOTICES:
        _NOTICES.add(chosen.notice)
        print(f"fastfeat: {chosen.notice}", file=sys.stderr)
    return chosen


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


# --compile auto: the images a run needs before torch.compile's start-up pays back, by (job, device type,
# precision), as measured (docs/precision.md). A combination not listed measured no faster compiled, or was
# never measured, and stays eager; the GPU rows are a guess until measured.
AUTO_COMPILE_IMAGES: dict[tuple[str, str, str], int] = {
    ("forward", "cpu", "float32"): 50_000,
    ("forward", "cpu", "bfloat16"): 100_000,
    **{(job, "cuda", dtype): 500_000 for job in ("forward", "training") for dtype in ("bfloat16", "float16")},
}


def compile_wanted(setting: bool | str, images: int, device: torch.device, job: str, dtype: torch.dtype | None) -> bool:
    """`--compile` / `--no-compile` force it; `auto` compiles a `job` ("forward" or "training") of
    `images` when that many pay back the compile time on this device at this precision."""
    if setting == "auto":
        needed = AUTO_COMPILE_IMAGES.get((job, device.type, precision_name(dtype)))
        return needed is not None and images >= needed
    return bool(setting)


class CompiledOrEager:
    """`torch.compile(model)` where `enabled`, falling back to the eager model, with one line, when
    compiling fails (no C++ compiler, an unsupported model): at wrapping or at any call."""

    def __init__(self, model: Callable, enabled: bool, options: dict | None = None):
        self.eager, self.run = model, model
        if enabled:
            try:
                self.run = torch.compile(model, options=options)
            except Exception as exc:  # noqa: BLE001 - any failure to compile means: run eagerly
                self._fall_back(exc)

    @property
    def compiled(self) -> bool:
        return self.run is not self.eager

    def _fall_back(self, exc: Exception) -> None:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        print(f"fastfeat: info: torch.compile failed ({type(exc).__name__}: {first}); running eagerly", file=sys.stderr)
        self.run = self.eager

    def __getattr__(self, name: str):
        """The model's own attributes (`eval()`, `train()`, ...): the compiled model shares its modules."""
        return getattr(self.eager, name)

    def __call__(self, *args, **kwargs):
        if not self.compiled:
            return self.eager(*args, **kwargs)
        try:
            return self.run(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._fall_back(exc)
            return self.eager(*args, **kwargs)
