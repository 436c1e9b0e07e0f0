"""The precision policy and --compile auto, with the hardware checks patched: every branch on any machine."""
from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest
import torch

from fastfeat import runtime
from fastfeat.errors import InputError
from fastfeat.runtime import CompiledOrEager, choose_precision, compile_wanted, precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def hardware(monkeypatch):
    """Set what this 'machine' has: native bf16 / fp16 kernels, fp16 faster than fp32, a bf16 GPU."""
    def set_(bf16=False, fp16=False, fp16_faster=False, cuda_bf16=False):
        monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: bf16)
        monkeypatch.setattr(runtime, "cpu_fp16_native", lambda: fp16)
        monkeypatch.setattr(runtime, "cpu_fp16_faster", lambda: fp16_faster)
        monkeypatch.setattr(runtime, "cuda_bf16_supported", lambda: cuda_bf16)
        monkeypatch.setattr(runtime, "cpu_capability", lambda: "TEST")
    return set_


@pytest.mark.parametrize("kw, device, dtype", [
    (dict(bf16=True), CPU, torch.bfloat16),                            # avx512_bf16 / AMX
    (dict(bf16=True, fp16=True, fp16_faster=True), CPU, torch.bfloat16),  # bf16 first where both are native
    (dict(fp16=True, fp16_faster=True), CPU, torch.float16),           # native fp16 that measures faster
    (dict(fp16=True, fp16_faster=False), CPU, None),                   # native fp16, slower than fp32
    (dict(), CPU, None),                                               # AVX2 only: everything emulated
    (dict(cuda_bf16=True), CUDA, torch.bfloat16),
    (dict(cuda_bf16=False), CUDA, torch.float16),
])
def test_amp_picks_the_fastest_native_precision(hardware, kw, device, dtype):
    hardware(**kw)
    chosen = precision(device, amp=True)
    assert chosen.dtype == dtype and chosen.native and chosen.reason
    assert (chosen.notice is not None) == (dtype is None)  # fp32 under --amp: say so


@pytest.mark.parametrize("machine, onednn, avx512_bf16, amx, native", [
    ("x86_64", True, False, False, False),  # AVX-512 without bf16 instructions: oneDNN says yes, but emulates
    ("x86_64", True, True, False, True),    # avx512_bf16
    ("x86_64", True, False, True, True),    # AMX
    ("x86_64", False, False, False, False),  # AVX2 only
    ("aarch64", True, False, False, True),  # arm's BF16 extension: oneDNN's check is the instruction set
    ("aarch64", False, False, False, False),
])
def test_native_bf16_needs_the_instructions_not_only_onednn(monkeypatch, machine, onednn, avx512_bf16, amx, native):
    monkeypatch.setattr(runtime.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert runtime.cpu_bf16_native() is native


def test_no_amp_is_fp32_without_a_notice(hardware):
    hardware(bf16=True)
    chosen = precision(CPU, amp=False)
    assert (chosen.dtype, chosen.name, chosen.notice, chosen.reason) == (None, "float32", None, "--no-amp")


@pytest.mark.parametrize("forced, kw, native", [
    ("bfloat16", dict(), False), ("bfloat16", dict(bf16=True), True),
    ("float16", dict(), False), ("float16", dict(fp16=True), True),
])
def test_forced_dtype_is_obeyed_and_says_when_it_is_emulated(hardware, forced, kw, native):
    hardware(**kw)
    chosen = precision(CPU, amp=True, forced=forced)
    assert chosen.name == forced and chosen.native == native
    if native:
        assert chosen.notice is None
    else:
        assert "emulated" in chosen.notice and "slow" in chosen.notice and "emulated" in chosen.reason


def test_forced_bf16_on_a_gpu_without_it_is_emulated(hardware):
    hardware(cuda_bf16=False)
    assert not precision(CUDA, True, "bfloat16").native and precision(CUDA, True, "float16").native


def test_unknown_forced_dtype_is_an_input_error(hardware):
    hardware()
    with pytest.raises(InputError, match="bfloat16 or float16"):
        precision(CPU, True, "float8")


def test_the_fp32_fallback_is_one_info_line_per_process(hardware, monkeypatch, capsys):
    hardware()
    monkeypatch.setattr(runtime, "_NOTICES", set())
    for _ in range(3):  # e.g. the bench's model, end-to-end and second model
        assert choose_precision(CPU, True).dtype is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("fastfeat: info: --amp runs in float32 here")


def test_compile_auto_compiles_only_long_runs():
    threshold = runtime.AUTO_COMPILE_IMAGES[("forward", "cpu", "float32")]
    assert not compile_wanted("auto", threshold - 1, CPU, "forward", None)
    assert compile_wanted("auto", threshold, CPU, "forward", None)
    assert compile_wanted(True, 1, CPU, "training", None) and not compile_wanted(False, 10**9, CPU, "forward", None)
    # a GPU's eager pass is faster: more images to pay back the same compile time
    assert runtime.AUTO_COMPILE_IMAGES[("forward", "cuda", "bfloat16")] > threshold


def test_compile_auto_stays_eager_where_compiling_never_measured_faster():
    assert not compile_wanted("auto", 10**9, CPU, "training", torch.bfloat16)


def test_a_compile_failure_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)

    def refuse(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", refuse)
    wrapped = CompiledOrEager(model, True)
    assert not wrapped.compiled and torch.equal(wrapped(x), model(x))
    err = capsys.readouterr().err.splitlines()
    assert err == ["fastfeat: info: torch.compile failed (RuntimeError: no C++ compiler found); running eagerly"]


def test_a_failure_at_the_first_compiled_call_falls_back_to_eager(monkeypatch, capsys):
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)

    def broken(*args, **kwargs):
        raise NotImplementedError("unsupported operator")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: broken)
    wrapped = CompiledOrEager(model, True)
    assert wrapped.compiled
    assert torch.equal(wrapped(x), model(x)) and not wrapped.compiled
    assert torch.equal(wrapped(x), model(x))  # and stays eager: one line only
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_the_cache_falls_back_to_eager_when_compile_fails(sample, tmp_path, monkeypatch, capsys):
    from fastfeat import CacheOptions, build_cache, read_cache

    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("inductor is broken")))
    kw = dict(data=str(sample), splits=("test",), limit=10, loader="torch", weights="none", device="cpu", amp=False,
              image_size=32, resize=32, progress=False)
    forced = build_cache(CacheOptions(out=str(tmp_path / "c.h5"), compile=True, **kw))
    eager = build_cache(CacheOptions(out=str(tmp_path / "e.h5"), compile=False, **kw))
    assert not forced.compiled and forced.metrics()["compiled"] is False
    assert "torch.compile failed (RuntimeError: inductor is broken); running eagerly" in capsys.readouterr().err
    torch.testing.assert_close(torch.from_numpy(read_cache(forced.out, splits=("test",)).features["test"]),
                               torch.from_numpy(read_cache(eager.out, splits=("test",)).features["test"]))


class _Mallinfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (malloc.h): `hblkhd` is the bytes held in separately mmapped blocks."""
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_bytes(libc) -> int:
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2().hblkhd


def test_cpu_runs_keep_large_blocks_in_the_heap(monkeypatch):
    """After an image job resolves a CPU, a 64 MB block comes from the heap, not from a fresh mmap."""
    libc = ctypes.CDLL(None)
    if not sys.platform.startswith("linux") or not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc >= 2.33 only")
    runtime.image_device("cpu")
    if runtime.keep_freed_memory() == "as set by the environment":
        pytest.skip("the environment sets the allocator")
    assert runtime.keep_freed_memory() == "glibc: one arena, freed memory kept"
    before = _mmapped_bytes(libc)
    block = np.ones(64 << 20, dtype=np.uint8)
    assert _mmapped_bytes(libc) == before and block.sum() == 64 << 20


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "4"}, {"LD_PRELOAD": "libjemalloc.so"}])
def test_the_users_allocator_settings_win(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ctypes, "CDLL", lambda *_: pytest.fail("mallopt called despite the environment"))
    assert runtime.keep_freed_memory.__wrapped__() == "as set by the environment"
