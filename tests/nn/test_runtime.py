"""Tests for segmenter.nn.runtime: which device a setting means and which autocast dtype runs
on it (GPU presence and CPU flags are faked, so the rules are checked on any machine)."""

from __future__ import annotations

import pytest
import torch

from segmenter.errors import InputError
from segmenter.nn import runtime
from segmenter.nn.runtime import autocast, autocast_dtype, resolve_device

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: str | None) -> None:
    """Make ``/proc/cpuinfo`` read ``flags`` (None: unreadable)."""

    class CpuInfo:
        def __init__(self, path: str) -> None:
            assert path == "/proc/cpuinfo"

        def read_text(self) -> str:
            if flags is None:
                raise OSError("no /proc here")
            return f"flags\t\t: fpu sse2 avx2 {flags}\n"

    monkeypatch.setattr(runtime, "Path", CpuInfo)


def test_auto_is_the_cpu_without_a_gpu(no_gpu: None) -> None:
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU


def test_auto_is_cuda_with_a_gpu(a_gpu: None) -> None:
    assert resolve_device("auto") == CUDA
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU  # asked for, still the CPU


def test_cuda_without_a_gpu_is_an_input_error(no_gpu: None) -> None:
    with pytest.raises(InputError, match="device 'cuda' requested but no CUDA GPU is available"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="device 'cuda:0' requested"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("name", ["tpu", "mps", "gpu", ""])
def test_an_unknown_device_is_an_input_error(name: str) -> None:
    with pytest.raises(InputError, match=rf"unknown device '{name}' \(use cpu, cuda or auto\)"):
        resolve_device(name)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_fixed_precisions_ignore_the_cpu_flags(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_flags(monkeypatch, None)
    assert autocast_dtype("fp32", device) is None
    assert autocast_dtype("bf16", device) is torch.bfloat16


def test_fp16_is_fp16_on_cuda_and_bf16_on_the_cpu() -> None:
    assert autocast_dtype("fp16", CUDA) is torch.float16
    assert autocast_dtype("fp16", CPU) is torch.bfloat16  # CPUs autocast to bf16 only


def test_auto_is_fp16_on_cuda_whatever_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_flags(monkeypatch, "")
    assert autocast_dtype("auto", CUDA) is torch.float16


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("avx512_bf16", torch.bfloat16), ("amx_bf16 amx_tile", torch.bfloat16), ("avx512f", None),
     (None, None)],
    ids=["avx512_bf16", "amx_bf16", "no native bf16", "cpuinfo unreadable"],
)  # fmt: skip
def test_auto_on_the_cpu_is_bf16_only_with_native_bf16_matmuls(
    flags: str | None, expected: torch.dtype | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_flags(monkeypatch, flags)
    assert autocast_dtype("auto", CPU) is expected


def test_autocast_runs_matmuls_in_its_dtype_or_leaves_float32() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(CPU, None):
        assert (a @ b).dtype == torch.float32
    with autocast(CPU, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32
